"""Sparse training on CUDA: the same invariants as on the CPU, SR-STE's 2:4 result on the semi-structured path,
the ``secateurs train`` loop and mask-preserving fine-tuning on the GPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.train import GMP, SET, SRSTE, KernelRigL, RigL, SparseTraining, Static
from secateurs.train import masks as M

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _mlp(width=128):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 64))


def _batches(n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(32, 64, generator=g).to(device), torch.randint(0, 64, (32,), generator=g).to(device))
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "method", [Static(), SET(interval=3), RigL(interval=3), GMP(begin=0.0, end=0.8, interval=2)], ids=str
)
def test_pruned_weights_stay_zero_on_cuda(method):
    model = _mlp().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    sparse = SparseTraining(model, opt, method, sparsity=0.8, distribution="uniform", total_steps=20)
    for x, y in _batches(20, "cuda"):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sparse.step()
        for name, keep in sparse.keep_masks().items():
            W = model.get_submodule(name).weight
            assert keep.device.type == "cuda"
            assert (W[~keep] == 0).all(), name
            buf = opt.state[W].get("momentum_buffer")
            assert buf is None or (buf[~keep] == 0).all(), name
    for name, keep in sparse.keep_masks().items():
        numel = keep.numel()
        assert int(keep.sum()) == M.kept_count(numel, 0.2), name  # exact count on the GPU too
    if not isinstance(method, Static | GMP):
        assert sparse.history, "a dynamic method must have updated its masks"


def test_kernel_rigl_on_cuda_prunes_whole_kernels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = SparseTraining(
        model, opt, KernelRigL(interval=2), sparsity=0.75, distribution="uniform", targets=["2"], total_steps=10
    )
    for _ in range(10):
        x = torch.randn(8, 3, 8, 8, device="cuda")
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sparse.step()
    W = model[2].weight
    zero_kernels = (W.flatten(2) == 0).all(-1)
    assert int(zero_kernels.sum()) == 16 * 16 - M.kept_count(16 * 16, 0.25)
    assert sparse.history


def test_srste_2_4_runs_on_the_semi_structured_path():
    from secateurs.runtime.cuda import semi_structured_support, to_semi_structured

    model = _mlp().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = SparseTraining(model, opt, SRSTE(), pattern="2:4", total_steps=10)
    for x, y in _batches(10, "cuda"):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sparse.step()
    sparse.finalize()
    for name in ("0", "2", "4"):
        W = model.get_submodule(name).weight
        assert ((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name
    why = semi_structured_support()
    if why:
        pytest.skip(why)
    model = model.half().eval()
    x = torch.randn(64, 64, device="cuda", dtype=torch.half)
    with torch.no_grad():
        dense = model(x)
        summary = to_semi_structured(model)
        fast = model(x)
    assert summary["converted"] == 3
    assert torch.allclose(dense, fast, rtol=1e-2, atol=1e-2)


def test_train_loop_on_cuda(tmp_path):
    from safetensors.torch import load_file

    from secateurs.train.loop import TrainConfig, train

    config = TrainConfig(
        method="rigl", method_options={"interval": 4}, model_options={"hidden": [64]}, epochs=3, batch_size=128
    )
    metrics = train(config, tmp_path / "run", progress=False, plots=False, device="cuda")
    assert metrics["complete"] and metrics["peak_memory"]["cuda_bytes"] > 0
    assert metrics["sparsity"]["overall"] == pytest.approx(0.9, abs=0.01)
    assert metrics["final"]["accuracy"] > 0.3  # chance is 0.1
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(t.device.type == "cpu" for t in weights.values())


def test_finetune_on_cuda_keeps_the_masks(tiny_model_dir, text_file, tmp_path):
    from conftest import run_main

    from secateurs.loading import load_masks
    from secateurs.train.finetune import finetune

    pruned = tmp_path / "pruned"
    code, _, err = run_main(
        "prune", tiny_model_dir, "--method", "wanda", "--sparsity", "0.5", "--calibration", text_file,
        "--eval", text_file, "--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--output", pruned,
        "--quiet", "--device", "cuda",
    )  # fmt: skip
    assert code == 0, err
    _, _, report = finetune(
        pruned, data=str(text_file), steps=8, seqlen=32, lr=1e-3, eval_source=str(text_file), eval_windows=2,
        eval_seqlen=32, output=tmp_path / "tuned", progress=False, device="cuda",
    )  # fmt: skip
    assert report["finetune"]["device"].startswith("cuda") and report["finetune"]["peak_cuda_bytes"] > 0
    assert report["sparsity"]["pruned_zero"] and report["sparsity"]["rows_unchanged"]
    masks = load_masks(pruned)
    assert all(torch.equal(load_masks(tmp_path / "tuned")[k], masks[k]) for k in masks)
