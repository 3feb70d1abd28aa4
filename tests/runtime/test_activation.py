"""Activation sparsity (secateurs.runtime.activation): thresholds, the kernel model against a pure-torch
restatement, load_sparse / bench / eval."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import run_main, tiny_model

import secateurs
from secateurs.checkpoint import save_sparse
from secateurs.errors import SecateursError
from secateurs.runtime import bench
from secateurs.runtime.activation import activation_linears, calibrate_thresholds, sparsify_activations, targets
from secateurs.runtime.linear import SparseLinear, load_sparse

WINDOWS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


def all_inputs(model, windows) -> dict[str, torch.Tensor]:
    """Every |input| of every linear but the head over the windows, by brute force."""
    seen = {}
    handles = []
    for name, module in activation_linears(model).items():

        def hook(module, args, name=name):
            seen.setdefault(name, []).append(args[0].detach().abs().reshape(-1))

        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in windows:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    for h in handles:
        h.remove()
    return {name: torch.cat(v) for name, v in seen.items()}


def test_targets_from_a_number_or_patterns():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert targets(names, 0.4) == dict.fromkeys(names, 0.4)
    got = targets(names, {"*.layers.0.*": 0.5, "*down_proj": 0.25})  # first pattern that matches wins
    assert got == {names[0]: 0.5, names[1]: 0.5, names[2]: 0.25}
    bad_values = ((1.0, r"\[0, 1\)"), (-0.1, r"\[0, 1\)"), ("half", "number"), ({"*.nothing": 0.5}, "matches no"))
    for bad, message in bad_values:
        with pytest.raises(SecateursError, match=message):
            targets(names, bad)


def test_thresholds_are_the_quantiles_of_the_inputs():
    """With every input kept (no sampling), each threshold is the ceil(target * N)-th smallest |x|, and exactly that
    fraction of the calibration inputs falls at or below it; q/k/v (and gate/up) share their input, so their
    thresholds are equal."""
    model = tiny_model("llama")
    names = list(activation_linears(model))
    assert len(names) == 3 * 7 and not any("lm_head" in n for n in names)
    thresholds = calibrate_thresholds(model, WINDOWS, dict.fromkeys(names, 0.4), samples=10**9)
    inputs = all_inputs(model, WINDOWS)
    for name in names:
        values = inputs[name].sort().values
        k = round(0.4 * values.numel())
        assert thresholds[name] == pytest.approx(float(values[k - 1]), abs=0)
        assert float((inputs[name] <= thresholds[name]).float().mean()) == pytest.approx(0.4, abs=0.01)
    layer = "model.layers.1"
    assert thresholds[f"{layer}.self_attn.q_proj"] == thresholds[f"{layer}.self_attn.v_proj"]
    assert thresholds[f"{layer}.mlp.gate_proj"] == thresholds[f"{layer}.mlp.up_proj"]
    assert thresholds[f"{layer}.mlp.up_proj"] != thresholds[f"{layer}.mlp.down_proj"]
    # sampled: close to the exact quantile
    sampled = calibrate_thresholds(model, WINDOWS, dict.fromkeys(names, 0.4), samples=512)
    for name in names:
        assert float((inputs[name] <= sampled[name]).float().mean()) == pytest.approx(0.4, abs=0.08)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_model_equals_a_pure_torch_restatement(family, dtype):
    """The kernel model (column layout, thresholds in the kernel) gives the logits of the original model with each
    linear's input thresholded by hand, and the same greedy tokens."""
    model = tiny_model(family).to(dtype)
    secateurs.prune(model, secateurs.Recipe(method="magnitude", sparsity=0.5), progress=False)
    restated, pruned = copy.deepcopy(model), copy.deepcopy(model)
    summary = sparsify_activations(model, 0.4, windows=WINDOWS, kernel=True)
    assert summary["kernel"] and summary["linears"] == len(activation_linears(restated))
    assert summary["measured_on_first_window"] == pytest.approx(0.4, abs=0.1)
    for name, tau in summary["thresholds"].items():
        module = model.get_submodule(name)
        assert isinstance(module, SparseLinear) and module.packed.layout == "columns" and module.threshold == tau

        def hook(module, args, tau=tau):
            x = args[0]
            return (torch.where(x.float().abs() <= tau, torch.zeros_like(x), x),)

        restated.get_submodule(name).register_forward_pre_hook(hook)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        got, want = model(ids).logits.float(), restated(ids).logits.float()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert not torch.allclose(got, pruned(ids).logits.float(), rtol=tol, atol=tol)  # thresholds changed it
        if dtype == torch.float32:  # decode: one token at a time through the kernel's column path
            a = model.generate(ids[:1], max_new_tokens=6, do_sample=False, min_new_tokens=6)
            b = restated.generate(ids[:1], max_new_tokens=6, do_sample=False, min_new_tokens=6)
            assert torch.equal(a, b)


def test_hooks_and_kernel_give_the_same_model():
    model = tiny_model("llama")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    sa = sparsify_activations(a, 0.5, windows=WINDOWS, kernel=True)
    sb = sparsify_activations(b, 0.5, windows=WINDOWS, kernel=False)
    assert sa["thresholds"] == sb["thresholds"] and not sb["kernel"]
    for done in (a, b):  # a second call would threshold twice (or calibrate on thresholded inputs): refused
        with pytest.raises(SecateursError, match="already thresholded"):
            sparsify_activations(done, 0.3, windows=WINDOWS)
    assert not any(isinstance(m, SparseLinear) for m in b.modules())
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=1e-4, atol=1e-4)


def test_per_layer_targets_leave_the_rest_alone():
    model = tiny_model("llama")
    summary = sparsify_activations(model, {"*.mlp.down_proj": 0.5, "*.layers.0.*": 0.2}, windows=WINDOWS)
    assert sorted(summary["thresholds"]) == sorted(
        [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
        + [f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
        + [f"model.layers.0.{n}" for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")]
    )
    assert isinstance(model.model.layers[1].self_attn.q_proj, torch.nn.Linear)
    assert model.model.layers[1].mlp.down_proj.threshold == summary["thresholds"]["model.layers.1.mlp.down_proj"]


def test_kernel_refuses_what_it_cannot_hold():
    model = tiny_model("llama").to(torch.float16)
    with pytest.raises(SecateursError, match="cannot run on the CPU kernel"):
        sparsify_activations(model, 0.3, windows=WINDOWS, kernel=True)
    with pytest.raises(SecateursError, match="tokenizer or token windows"):
        sparsify_activations(tiny_model("llama"), 0.3)


@pytest.fixture
def sparse_tiny_dir(tmp_path, tiny_model_dir):
    model, tokenizer, _ = secateurs.load_model(str(tiny_model_dir))
    secateurs.prune(model, secateurs.Recipe(method="magnitude", sparsity=0.5), progress=False)
    save_sparse(model, tokenizer, tmp_path / "s", progress=False)
    return tmp_path / "s"


def test_load_sparse_with_activation_sparsity(sparse_tiny_dir):
    """Calibrated on the default bundled text (windows no longer than the model's 128 positions), every linear but
    the head in the column layout with its threshold; one copy of each weight."""
    model, tokenizer = load_sparse(sparse_tiny_dir, activation_sparsity=0.4)
    linears = activation_linears(model)
    assert all(isinstance(m, SparseLinear) and m.packed.layout == "columns" for m in linears.values())
    assert all(m.threshold is not None and m.threshold > 0 for m in linears.values())
    assert not isinstance(model.lm_head, SparseLinear) or model.lm_head.threshold is None
    plain, _ = load_sparse(sparse_tiny_dir)
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, plain(ids).logits)
    with pytest.raises(SecateursError, match=r"\[0, 1\)"):
        load_sparse(sparse_tiny_dir, activation_sparsity=1.5)


def test_bench_measures_weights_only_too(sparse_tiny_dir):
    result = bench.benchmark(
        sparse_tiny_dir, tokens=3, prompt_len=4, repeat=1, threads=1, micro=False, activation_sparsity=0.4
    )
    assert result["activation_sparsity"] == 0.4 and result["weights_only"]["decode_tokens_per_s"] > 0
    assert result["speedup_decode_vs_weights_only"] == pytest.approx(
        result["sparse"]["decode_tokens_per_s"] / result["weights_only"]["decode_tokens_per_s"]
    )
    assert result["conversion"]["activation"]["linears"] == 21
    assert "activation sparsity 0.4" in bench.format_table(result)


def test_cli_eval_and_bench_with_activation_sparsity(sparse_tiny_dir):
    args = ["--eval", "bible", "--eval-windows", "2", "--seqlen", "64", "--json", "--quiet"]
    code, out, err = run_main("eval", sparse_tiny_dir, *args)
    assert code == 0, err
    plain = json.loads(out)
    code, out, err = run_main("eval", sparse_tiny_dir, *args, "--activation-sparsity", "0.5")
    assert code == 0, err
    thresholded = json.loads(out)
    summary = thresholded["activation_sparsity"]
    assert summary["linears"] == 21 and "thresholds" not in summary
    assert thresholded["perplexity"] != plain["perplexity"]
    code, out, err = run_main("eval", sparse_tiny_dir, *args, "--activation-sparsity", "1")
    assert code == 2 and out == "" and err.count("secateurs: error:") == 1 and "[0, 1)" in err
    bench_args = ["--tokens", "3", "--prompt-len", "4", "--repeat", "1", "--threads", "1", "--quiet", "--no-micro"]
    code, out, err = run_main("bench", sparse_tiny_dir, *bench_args, "--activation-sparsity", "0.3")
    assert code == 0 and "the same weights without it" in out, err
