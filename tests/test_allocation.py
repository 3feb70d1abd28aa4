"""Per-layer sparsity: OWL against hand computations, user tables."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, tiny_model

import secateurs
from secateurs.allocation import load_allocation, nm_per_layer, outlier_ratio, owl_sparsities
from secateurs.models import find_layers, find_linears, weight_view


def test_outlier_ratio_counts_scores_above_m_times_mean():
    # mean of [1]*8 + [10, 30] = 48 / 10 = 4.8; above 3 x 4.8 = 14.4: only the 30 -> 1 of 10
    assert outlier_ratio([torch.ones(2, 4), torch.tensor([10.0, 30.0])], M=3) == pytest.approx(0.1)
    assert outlier_ratio([torch.ones(2, 4), torch.tensor([10.0, 30.0])], M=2) == pytest.approx(0.2)
    assert outlier_ratio([torch.ones(5)], M=1) == 0.0


def test_owl_sparsities_match_hand_computation():
    ratios = [0.01, 0.03, 0.02, 0.00]
    # min-max to [0, 2*0.1]: [0.05, 0.15, 0.10, 0.00] * ... -> scaled = (D - 0) / 0.03 * 0.2
    scaled = [0.2 / 3, 0.2, 0.4 / 3, 0.0]
    mean = sum(scaled) / 4
    expected = [0.7 - (x - mean) for x in scaled]
    got = owl_sparsities(ratios, 0.7, lam=0.1)
    assert got == pytest.approx(expected)
    assert sum(got) / 4 == pytest.approx(0.7)
    assert max(got) - min(got) == pytest.approx(0.2)
    assert got[1] == min(got) and got[3] == max(got)  # most outliers -> pruned least


def test_owl_all_layers_equal_is_uniform():
    assert owl_sparsities([0.02] * 5, 0.6) == [0.6] * 5


def test_owl_out_of_range_is_an_error():
    with pytest.raises(secateurs.SecateursError, match="outside"):
        owl_sparsities([0.0, 1.0], 0.05, lam=0.2)


def test_owl_on_a_model_matches_brute_force_ratios():
    """Ratios from the engine's dense pass equal Wanda scores computed by hand from the dense activations."""
    model = tiny_model("llama")
    layers = find_layers(model)[1]
    # a few huge weights: outliers in layer 1's scores and, through the residual stream, in later layers
    with torch.no_grad():
        layers[1].mlp.down_proj.weight[:, :3] *= 50
    windows = torch.randint(0, VOCAB, (3, 16))
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, key=(i, n): inputs.setdefault(key, []).append(a[0].clone()))
        for i, layer in enumerate(layers)
        for n, m in find_linears(layer).items()
    ]
    with torch.no_grad():
        for row in windows:
            model(row.unsqueeze(0))
    for h in hooks:
        h.remove()
    ratios = []
    for i, layer in enumerate(layers):
        scores = []
        for n, m in find_linears(layer).items():
            X = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[(i, n)]])
            scores.append(weight_view(m).abs() * torch.sqrt((X**2).sum(0) / len(windows)))
        flat = torch.cat([s.flatten() for s in scores])
        ratios.append((flat > 5 * flat.mean()).float().mean().item())
    expected = owl_sparsities(ratios, 0.6, 0.08)

    report = secateurs.prune(model, secateurs.Recipe(sparsity=0.6, allocation="owl"), windows, progress=False)
    got = [layer["sparsity_target"] for layer in report.layers]
    assert [layer["outlier_ratio"] for layer in report.layers] == pytest.approx(ratios, rel=1e-4)
    assert got == pytest.approx(expected, rel=1e-4)
    assert sum(got) / len(got) == pytest.approx(0.6)
    assert got[ratios.index(max(ratios))] == min(got)  # most outliers -> pruned least
    for layer, target in zip(layers, got, strict=True):
        for m in find_linears(layer).values():
            W = weight_view(m)
            assert ((W == 0).sum(1) == int(W.shape[1] * target)).all()  # Wanda: per row, floor(cols * s)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_owl_works_with_every_method(method):
    model = tiny_model("qwen2")
    report = secateurs.prune(
        model,
        secateurs.Recipe(method=method, sparsity=0.5, allocation="owl"),
        torch.randint(0, VOCAB, (2, 16)),
        progress=False,
    )
    assert all("outlier_ratio" in layer for layer in report.layers)
    assert report.calibration is not None


def test_allocation_file(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "alloc.json"
    path.write_text(json.dumps({"0": 0.2, "model.layers.1": 0.5, "2": 0.8}))
    report = secateurs.prune(
        model, secateurs.Recipe(sparsity=0.5, allocation=str(path)), torch.randint(0, VOCAB, (2, 16)), progress=False
    )
    assert [layer["sparsity_target"] for layer in report.layers] == [0.2, 0.5, 0.8]


@pytest.mark.parametrize(
    "table,match",
    [({"0": 0.2}, "no sparsity for 2"), ({"0": 0.2, "1": 1.5, "2": 0}, "must be in"), ({"9": 0.1}, "unknown layer")],
)
def test_allocation_file_errors(tmp_path, table, match):
    path = tmp_path / "alloc.json"
    path.write_text(json.dumps(table))
    with pytest.raises(secateurs.SecateursError, match=match):
        load_allocation(path, ["model.layers.0", "model.layers.1", "model.layers.2"])


def test_nm_per_layer_rounds_n_within_one_and_m_minus_one():
    assert [str(nm) for nm in nm_per_layer([0.5, 0.42, 0.58, 0.05, 0.99], 8)] == ["4:8", "3:8", "5:8", "1:8", "7:8"]


def test_nm_per_layer_keeps_the_mean():
    # 8 * s = [4.4, 4.4, 3.2]: plain rounding gives 4 + 4 + 3 = 11, but the total must stay 12
    nms = nm_per_layer([0.55, 0.55, 0.4], 8)
    assert [nm.n for nm in nms] == [5, 4, 3] or [nm.n for nm in nms] == [4, 5, 3]
    assert sum(nm.n for nm in nms) == 12


def test_owl_with_nm_gives_each_layer_its_own_n(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "alloc.json"
    path.write_text(json.dumps([0.375, 0.5, 0.625]))
    report = secateurs.prune(
        model, secateurs.Recipe(pattern="4:8", allocation=str(path)), torch.randint(0, VOCAB, (2, 16)), progress=False
    )
    assert [layer["sparsity_target"] for layer in report.layers] == [3 / 8, 4 / 8, 5 / 8]
    for n, layer in zip((3, 4, 5), find_layers(model)[1], strict=True):
        for module in find_linears(layer).values():
            W = weight_view(module)
            assert ((W.reshape(W.shape[0], -1, 8) == 0).sum(-1) == n).all()
    report = secateurs.prune(
        tiny_model("llama"),
        secateurs.Recipe(pattern="4:8", allocation="owl", owl_lambda=0.15),
        torch.randint(0, VOCAB, (2, 16)),
        progress=False,
    )
    targets = [layer["sparsity_target"] for layer in report.layers]
    assert sum(targets) / len(targets) == pytest.approx(0.5)  # largest-remainder rounding keeps the mean
    assert all(t * 8 == round(t * 8) and 2 / 8 <= t <= 6 / 8 for t in targets)


def test_dense_pass_leaves_the_model_untouched():
    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from secateurs.engine import dense_walk

    dense_walk(model, torch.randint(0, VOCAB, (2, 8)), torch.device("cpu"), lambda i, lin, st: i, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
