"""Per-layer sparsity: OWL against hand computations, user tables."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, tiny_model

import secateurs
from secateurs.oneshot.allocations.owl import outlier_ratio, owl_sparsities
from secateurs.oneshot.allocations.table import load_allocation
from secateurs.oneshot.select import nm_per_layer


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


def _own_linears(layer) -> dict:
    """A decoder layer's nn.Linear modules by name (found here, not by the library)."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def _own_owl_ratios(model, windows, M=5.0) -> list[float]:
    """OWL's D_l from scratch: ONE pass of the DENSE model over the windows, hooks on every decoder linear.

    score_ij = |W_ij| * sqrt(mean over windows of ||X_j||^2), all of a layer's linears concatenated; D_l is the
    fraction above M x their mean. Sums in float32 per window, as any implementation would accumulate them.
    """
    layers = model.model.layers
    sq: dict = {}

    def hook(args, key):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        sq[key] = sq.get(key, 0) + (x * x).sum(0)

    hooks = [
        m.register_forward_pre_hook(lambda mod, args, key=(i, n): hook(args, key))
        for i, layer in enumerate(layers)
        for n, m in _own_linears(layer).items()
    ]
    with torch.no_grad():
        for row in windows:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    ratios = []
    for i, layer in enumerate(layers):
        scores = [
            m.weight.detach().float().abs() * torch.sqrt(sq[(i, n)] / len(windows)).reshape(1, -1)
            for n, m in _own_linears(layer).items()
        ]
        flat = torch.cat([s.flatten() for s in scores])
        ratios.append((flat > M * flat.mean()).sum().item() / flat.numel())
    return ratios


def _own_owl_sparsities(ratios, target, lam) -> list[float]:
    """Min-max scale D to [0, 2 lam], centre, sparsity_l = target - (scaled_l - mean(scaled)); plain floats."""
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(scaled) / len(scaled)
    return [target - (x - mean) for x in scaled]


def _own_nm_per_layer(sparsities, m) -> list[int]:
    """N_l = M * s_l, rounded by largest remainder (so the sum is kept), clamped to 1..M-1."""
    wanted = [m * s for s in sparsities]
    n = [int(x) for x in wanted]
    spare = round(sum(wanted)) - sum(n)
    for i in sorted(range(len(n)), key=lambda i: wanted[i] - n[i], reverse=True)[: max(spare, 0)]:
        n[i] += 1
    return [min(max(k, 1), m - 1) for k in n]


def _zeros_per_group(W, m):
    return (W.reshape(W.shape[0], -1, m) == 0).sum(-1)


def _outlier_model(family="llama"):
    model = tiny_model(family)
    # a few huge weights: outliers in layer 1's scores and, through the residual stream, in later layers
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, :3] *= 50
    assert all((m.weight != 0).all() for layer in model.model.layers for m in _own_linears(layer).values())
    return model


def test_owl_sparsities_hand_example():
    # D = [0.01, 0.02, 0.04], target 0.5, lambda 0.08: min 0.01, spread 0.03, 2 lambda = 0.16
    # scaled = (D - 0.01) / 0.03 * 0.16 = [0, 0.16/3, 0.16] = [0, 12/225, 36/225]; mean = 16/225
    # sparsity = 0.5 - (scaled - 16/225) = [0.5 + 16/225, 0.5 + 4/225, 0.5 - 20/225]
    #          = [0.571111..., 0.517777..., 0.411111...]   (mean 0.5, range 0.16, most outliers -> least)
    got = owl_sparsities([0.01, 0.02, 0.04], 0.5, lam=0.08)
    assert got == pytest.approx([0.5 + 16 / 225, 0.5 + 4 / 225, 0.5 - 20 / 225], abs=1e-12)
    assert got == pytest.approx([0.5711111111, 0.5177777778, 0.4111111111], abs=1e-9)


def test_owl_on_a_model_matches_brute_force_ratios():
    """Report's per-layer outlier ratios and targets equal an independent computation from the dense model."""
    windows = torch.randint(0, VOCAB, (3, 16))
    ratios = _own_owl_ratios(_outlier_model(), windows)
    assert len(set(ratios)) == len(ratios)  # the layers really differ, so OWL must give them different targets
    expected = _own_owl_sparsities(ratios, 0.6, 0.08)

    model = _outlier_model()
    report = secateurs.prune(model, secateurs.Recipe(sparsity=0.6, allocation="owl"), windows, progress=False)
    got = [layer["sparsity_target"] for layer in report.layers]
    assert [layer["outlier_ratio"] for layer in report.layers] == pytest.approx(ratios, abs=1e-6)
    assert got == pytest.approx(expected, abs=1e-6)
    assert max(got) - min(got) == pytest.approx(0.16, abs=1e-9)  # the full range 2 lambda
    assert sum(got) / len(got) == pytest.approx(0.6)
    assert got[ratios.index(max(ratios))] == min(got)  # most outliers -> pruned least
    for layer, target in zip(model.model.layers, got, strict=True):
        for m in _own_linears(layer).values():
            W = m.weight
            assert ((W == 0).sum(1) == int(W.shape[1] * target)).all()  # Wanda: per row, floor(cols * s)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_owl_works_with_every_method(method):
    """The ratios come from the dense model whatever the method; each matrix then gets its layer's exact count."""
    windows = torch.randint(0, VOCAB, (2, 16))
    ratios = _own_owl_ratios(_outlier_model("qwen2"), windows)
    expected = _own_owl_sparsities(ratios, 0.5, 0.08)
    model = _outlier_model("qwen2")
    report = secateurs.prune(
        model, secateurs.Recipe(method=method, sparsity=0.5, allocation="owl"), windows, progress=False
    )
    assert [layer["outlier_ratio"] for layer in report.layers] == pytest.approx(ratios, abs=1e-6)
    assert [layer["sparsity_target"] for layer in report.layers] == pytest.approx(expected, abs=1e-6)
    assert expected[0] != pytest.approx(expected[1])
    assert report.calibration is not None
    for layer, target in zip(model.model.layers, [t["sparsity_target"] for t in report.layers], strict=True):
        for m in _own_linears(layer).values():
            assert (m.weight == 0).sum() == int(m.weight.numel() * target)  # per matrix, floor(numel * s_l)


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


def test_allocation_file_with_nm_gives_each_layer_its_own_n(tmp_path):
    model = tiny_model("llama")
    assert all((m.weight != 0).all() for layer in model.model.layers for m in _own_linears(layer).values())
    path = tmp_path / "alloc.json"
    path.write_text(json.dumps([0.375, 0.5, 0.625]))
    report = secateurs.prune(
        model, secateurs.Recipe(pattern="4:8", allocation=str(path)), torch.randint(0, VOCAB, (2, 16)), progress=False
    )
    assert [layer["sparsity_target"] for layer in report.layers] == [3 / 8, 4 / 8, 5 / 8]
    for n, layer in zip((3, 4, 5), model.model.layers, strict=True):
        for module in _own_linears(layer).values():
            assert (_zeros_per_group(module.weight, 8) == n).all()


def test_owl_with_nm_gives_each_layer_its_own_n():
    """OWL + 4:8 with a wide lambda: N_l from the dense model's own outlier ratios, counted in the weights."""
    windows = torch.randint(0, VOCAB, (3, 16))
    ratios = _own_owl_ratios(_outlier_model(), windows)
    expected_n = _own_nm_per_layer(_own_owl_sparsities(ratios, 0.5, 0.15), 8)
    assert len(set(expected_n)) > 1, expected_n  # the case is only meaningful if the layers' N differ

    model = _outlier_model()
    recipe = secateurs.Recipe(method="wanda", pattern="4:8", allocation=secateurs.OWL(lam=0.15))
    report = secateurs.prune(model, recipe, windows, progress=False)
    assert [layer["outlier_ratio"] for layer in report.layers] == pytest.approx(ratios, abs=1e-6)
    assert [layer["sparsity_target"] for layer in report.layers] == [n / 8 for n in expected_n]
    for n, layer in zip(expected_n, model.model.layers, strict=True):
        for module in _own_linears(layer).values():
            assert (_zeros_per_group(module.weight, 8) == n).all()  # exactly N_l zeros in every group of 8
    counted = [int(_zeros_per_group(layer.mlp.down_proj.weight, 8)[0, 0]) for layer in model.model.layers]
    assert len(set(counted)) > 1, counted  # N differs between layers, as counted from the weights
    assert sum(counted) / len(counted) == pytest.approx(4)  # largest-remainder rounding keeps the mean


def test_dense_pass_leaves_the_model_untouched():
    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from secateurs.oneshot.walk import dense_walk

    dense_walk(
        model,
        torch.randint(0, VOCAB, (2, 8)),
        torch.device("cpu"),
        lambda i, lin, st: i,
        wanted=frozenset({"sq_norm"}),
        progress=False,
    )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
