"""The CUDA path: layers move to the GPU one at a time and come back (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

import secateurs
from secateurs.models import find_layers, find_linears, weight_view

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


RECIPES = {
    "magnitude": dict(method="magnitude"),
    "wanda": dict(method="wanda"),
    "sparsegpt": dict(method="sparsegpt"),
    "ria": dict(method="ria"),
    "ria-permute-2:4": dict(method=secateurs.RIA(permute=True), pattern="2:4"),
    "admm-gradual": dict(method="admm-gradual"),
    "wanda+admm": dict(method="wanda", update="admm"),
    "wanda+dsnot": dict(method="wanda", refine="dsnot"),
}


@pytest.mark.parametrize("method", list(RECIPES))
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_cuda_walk_matches_cpu(method, family):
    windows = torch.randint(0, VOCAB, (4, 24))
    cpu_model, gpu_model = tiny_model(family), tiny_model(family)
    recipe = secateurs.Recipe(**RECIPES[method])
    secateurs.prune(cpu_model, recipe, windows, device="cpu", progress=False)
    report = secateurs.prune(gpu_model, recipe, windows, device="cuda", progress=False)
    assert report.device.startswith("cuda")
    assert all(p.device.type == "cpu" for p in gpu_model.parameters()), "layers must go back where they were"
    for cpu_layer, gpu_layer in zip(find_layers(cpu_model)[1], find_layers(gpu_model)[1], strict=True):
        for (name, a), (_, b) in zip(find_linears(cpu_layer).items(), find_linears(gpu_layer).items(), strict=True):
            Wa, Wb = weight_view(a), weight_view(b)
            agree = ((Wa == 0) == (Wb == 0)).float().mean().item()
            assert agree > 0.99, (name, agree)  # float rounding may flip near-ties
            if method in ("sparsegpt", "admm-gradual", "wanda+admm"):
                assert torch.allclose(Wa, Wb, rtol=1e-3, atol=1e-3) or agree < 1


def test_cuda_evaluate_and_model_on_gpu():
    model = tiny_model("llama").cuda()
    windows = torch.randint(0, VOCAB, (2, 16))
    report = secateurs.prune(model, "sparsegpt", windows, device="cuda", progress=False)
    assert report.sparsity == pytest.approx(0.5)
    assert report.peak_cuda_bytes and report.peak_cuda_bytes > 0


# ----------------------------------------------------------------- 2:4 semi-structured sparse (runtime.cuda)
def _needs_semi_structured():
    from secateurs.runtime.cuda import semi_structured_support

    why = semi_structured_support()
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_semi_structured_matches_dense(family, dtype):
    import copy

    from secateurs.runtime.cuda import to_semi_structured

    _needs_semi_structured()
    model = tiny_model(family)
    secateurs.prune(model, secateurs.Recipe(method="magnitude", pattern="2:4"), progress=False)
    dense = model.to("cuda", dtype)
    sparse = copy.deepcopy(dense)
    summary = to_semi_structured(sparse)
    assert summary["converted"] > 0, summary
    ids = torch.randint(0, VOCAB, (2, 32), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits.float(), dense(ids).logits.float(), atol=3e-2, rtol=3e-2)
        out = sparse.generate(ids[:1, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_semi_structured_refuses_what_it_cannot_do():
    from secateurs.errors import SecateursError
    from secateurs.runtime.cuda import to_semi_structured

    _needs_semi_structured()
    unpruned = tiny_model("llama").to("cuda", torch.float16)
    with pytest.raises(SecateursError, match="--pattern 2:4"):
        to_semi_structured(unpruned)
    with pytest.raises(SecateursError, match="float16 or bfloat16"):
        to_semi_structured(tiny_model("llama").cuda())


def test_cli_bench_cuda(tmp_path, tiny_model_dir):
    import json

    from test_cli import run_main

    from secateurs.checkpoint import save_pruned

    _needs_semi_structured()
    model, tokenizer, _ = secateurs.load_model(str(tiny_model_dir))
    secateurs.prune(model, secateurs.Recipe(method="magnitude", pattern="2:4"), progress=False)
    save_pruned(model, tokenizer, tmp_path / "p")
    args = ["--device", "cuda", "--tokens", "4", "--prompt-len", "32", "--repeat", "1", "--json", "--quiet"]
    code, out, err = run_main("bench", tmp_path / "p", *args)
    assert code == 0, err
    result = json.loads(out)
    assert result["kernel_isa"] == "semi-structured 2:4" and result["dtype"] == "bfloat16"
    assert result["sparse"]["decode_tokens_per_s"] > 0 and result["dense"]["decode_tokens_per_s"] > 0
    assert result["sparse"]["weight_bytes"] < result["dense"]["weight_bytes"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offloaded_activations_give_the_same_masks(method):
    """Hidden states parked in pinned CPU memory between layers: the same masks and weights as on the GPU."""
    windows = torch.randint(0, VOCAB, (4, 24))
    kept, parked = tiny_model("llama"), tiny_model("llama")
    a = secateurs.prune(kept, method, windows, device="cuda", progress=False)
    b = secateurs.prune(parked, method, windows, device="cuda", progress=False, offload_activations=True)
    assert {n: m.digest() for n, m in a.masks.items()} == {n: m.digest() for n, m in b.masks.items()}
    for p, q in zip(kept.parameters(), parked.parameters(), strict=True):
        assert torch.equal(p, q)
