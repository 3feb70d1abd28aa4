"""The generic sequential walk, on tiny models of many families."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, VOCAB, tiny_model

import secateurs
from secateurs.models import find_layers, find_linears, weight_view


def _layer_inputs(model, windows):
    """Hidden states entering each decoder layer during a normal forward, per window."""
    _, layers = find_layers(model)
    seen = [[] for _ in layers]
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen[i].append((args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for row in windows:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_walk_feeds_each_layer_what_the_pruned_model_would(family, method):
    """Inputs seen by layer i during the walk equal its inputs in a forward of the final pruned model.

    This holds only if every keyword argument (masks, rotary embeddings, sliding windows ...) was replayed
    faithfully, layer by layer; seqlen 24 exceeds the tiny models' sliding windows.
    """
    model = tiny_model(family)
    windows = torch.randint(0, VOCAB, (3, 24))
    _, layers = find_layers(model)
    walked = [[] for _ in layers]
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: walked[i].append((args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    report = secateurs.prune(model, secateurs.Recipe(method=method, sparsity=0.5), windows, progress=False)
    for h in hooks:
        h.remove()
    expected = _layer_inputs(model, windows)
    for i in range(len(layers)):
        # after the capture pass (pass-through), each layer runs twice per window in the walk (statistics,
        # then the sparse recompute) with the same inputs
        assert len(walked[i]) == 3 * len(windows)
        walked[i] = walked[i][len(windows) :]
        for j in range(len(windows)):
            torch.testing.assert_close(walked[i][j], expected[i][j], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(walked[i][len(windows) + j], expected[i][j], rtol=1e-4, atol=1e-5)
    assert report.sparsity == pytest.approx(0.5, abs=1e-9)
    assert all(layer["output_error"] > 0 for layer in report.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_and_head_never_pruned(family):
    model = tiny_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    head_before = model.get_output_embeddings().weight.detach().clone()
    embed_before = model.get_input_embeddings().weight.detach().clone()
    report = secateurs.prune(model, "wanda", torch.randint(0, VOCAB, (2, 16)), progress=False)
    layers_name, layers = find_layers(model)
    pruned_weights = {f"{layers_name}.{i}.{n}.weight" for i, layer in enumerate(layers) for n in find_linears(layer)}
    assert {lin["name"] + ".weight" for lin in report.linears} == pruned_weights
    for name, param in model.named_parameters():
        if name not in pruned_weights:
            assert torch.equal(param, before[name]), f"{name} changed"
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    assert torch.equal(model.get_input_embeddings().weight, embed_before)


def test_magnitude_needs_no_calibration_and_thresholds_per_matrix():
    model = tiny_model("llama")
    original = {n: weight_view(m).clone() for n, m in find_linears(find_layers(model)[1][0]).items()}
    report = secateurs.prune(model, secateurs.Recipe(method="magnitude", sparsity=0.3), None, progress=False)
    assert report.calibration is None
    for name, module in find_linears(find_layers(model)[1][0]).items():
        W0 = original[name]
        W = weight_view(module)
        k = int(W0.numel() * 0.3)
        threshold = W0.abs().flatten().sort().values[k - 1]
        assert torch.equal(W == 0, W0.abs() <= threshold)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_pattern_every_group(method):
    model = tiny_model("qwen2")
    secateurs.prune(
        model, secateurs.Recipe(method=method, pattern="2:4"), torch.randint(0, VOCAB, (2, 16)), progress=False
    )
    for layer in find_layers(model)[1]:
        for module in find_linears(layer).values():
            W = weight_view(module)
            zeros = (W.reshape(W.shape[0], -1, 4) == 0).sum(-1)
            assert (zeros >= 2).all()


def test_exclude_leaves_linears_dense():
    model = tiny_model("llama")
    report = secateurs.prune(
        model,
        secateurs.Recipe(sparsity=0.5, exclude=["*.mlp.down_proj"]),
        torch.randint(0, VOCAB, (2, 16)),
        progress=False,
    )
    assert not any(lin["name"].endswith("down_proj") for lin in report.linears)
    for layer in find_layers(model)[1]:
        assert torch.count_nonzero(layer.mlp.down_proj.weight) == layer.mlp.down_proj.weight.numel()


def test_nm_width_not_divisible_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(secateurs.SecateursError, match="divisible by 5"):
        secateurs.prune(model, secateurs.Recipe(pattern="2:5"), torch.randint(0, VOCAB, (1, 8)), progress=False)


def test_report_counts_and_per_linear_sparsity():
    model = tiny_model("opt")
    report = secateurs.prune(
        model, secateurs.Recipe(method="wanda", sparsity=0.7), torch.randint(0, VOCAB, (2, 16)), progress=False
    )
    data = report.to_dict()
    assert data["recipe"]["method"] == "wanda"
    for lin in report.linears:
        rows, cols = lin["shape"]
        assert lin["pruned"] == rows * int(cols * 0.7)
    assert report.prune_seconds > 0 and report.peak_rss_bytes > 0
    assert data["versions"]["torch"]


def test_linears_fed_the_same_input_share_statistics():
    from secateurs.engine import InputStats, _StatsCollector

    model = tiny_model("llama")
    layer = find_layers(model)[1][0]
    linears = find_linears(layer)
    inputs = {n: [] for n in linears}
    probes = [
        m.register_forward_pre_hook(lambda mod, a, n=n: inputs[n].append(a[0].clone())) for n, m in linears.items()
    ]
    stats = {n: InputStats() for n in linears}
    collector = _StatsCollector(stats, want_hessian=True)
    hooks = [m.register_forward_hook(collector.hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, VOCAB, (1, 12)))
            collector.next_window()
    for h in hooks + probes:
        h.remove()
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
    assert stats["mlp.down_proj"] is not stats["mlp.up_proj"]
    for name, seen in inputs.items():
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])
        assert stats[name].nsamples == 3
        torch.testing.assert_close(stats[name].sq_norm, (X**2).sum(0))
        torch.testing.assert_close(stats[name].H_sum, X.t() @ X)


def test_windows_longer_than_the_model_allows_are_refused():
    model = tiny_model("gpt2")  # 128 positions
    with pytest.raises(secateurs.SecateursError, match="exceeds the model's maximum of 128"):
        secateurs.prune(model, "wanda", torch.randint(0, VOCAB, (1, 200)), progress=False)


def test_a_model_in_training_mode_is_pruned_without_dropout():
    windows = torch.randint(0, VOCAB, (2, 16))
    reports = []
    for _ in range(2):
        model = tiny_model("gpt2")  # GPT-2 has dropout 0.1 by default
        model.train()
        reports.append(secateurs.prune(model, "sparsegpt", windows, progress=False))
        assert model.training  # left as it was
    assert [layer["output_error"] for layer in reports[0].layers] == [
        layer["output_error"] for layer in reports[1].layers
    ]
