"""DSnoT: the vectorised refinement against a plain per-row reference, its invariants, and the engine path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import VOCAB, tiny_model

from secateurs import Recipe, prune
from secateurs.oneshot.pruners.wanda import wanda_mask
from secateurs.oneshot.refiners.dsnot import DSnoT, dsnot, refined_weight
from secateurs.oneshot.select import NM


def reference_row(w0, w, pruned, mean, var, sq, *, nm, cycles, threshold, power, scale):
    """One row of DSnoT written as plainly as possible (lists and loops), for comparison."""
    cols = len(w0)
    mean = [m * scale for m in mean]
    pruned = list(pruned)
    kept0 = [not p for p in pruned]
    error = sum((w0[j] - w[j]) * mean[j] for j in range(cols))
    gain = [w0[j] * mean[j] if pruned[j] else 0.0 for j in range(cols)]
    cost = [w[j] * mean[j] if kept0[j] else 0.0 for j in range(cols)]
    rank = [gain[j] / max(var[j], torch.finfo(torch.float32).tiny) ** power for j in range(cols)]
    wanda = [abs(w[j]) * math.sqrt(sq[j]) for j in range(cols)]
    positive = error > 0
    # regrowth: pruned weights whose gain has the sign of the error, best rank first
    regrow = sorted(range(cols), key=lambda j: rank[j], reverse=positive)
    regrow = [j for j in regrow if pruned[j] and (gain[j] > 0 if positive else gain[j] < 0)]
    # pruning (unstructured): kept weights whose cost has the opposite sign, lowest Wanda score first
    prune_list = sorted(
        (k for k in range(cols) if kept0[k] and (cost[k] < 0 if positive else cost[k] > 0)), key=lambda k: wanda[k]
    )
    eligible = list(kept0)
    sign0 = math.copysign(1, error) if error else 0
    swaps = 0
    if abs(error) <= threshold:
        return pruned, swaps, error
    for step in range(cycles):
        if step >= len(regrow):
            break
        j = regrow[step]
        if nm is None:
            if step >= len(prune_list):
                break
            k = prune_list[step]
        else:
            start = j - j % nm.m
            candidates = [c for c in range(start, start + nm.m) if eligible[c]]
            if not candidates:
                break
            k = min(candidates, key=lambda c: (wanda[c], c))
        after = error - gain[j] + cost[k]
        if not ((math.copysign(1, after) if after else 0) == sign0 and abs(after) < abs(error)):
            break
        pruned[j], pruned[k] = False, True
        eligible[k] = False
        error = after
        swaps += 1
        if abs(error) <= threshold:
            break
    return pruned, swaps, error


def random_case(rows=12, cols=32, sparsity=0.6, nm=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(rows, cols, generator=g)
    X = torch.randn(200, cols, generator=g) * torch.rand(cols, generator=g) * 2 + torch.randn(cols, generator=g)
    sq = (X * X).sum(0)
    pruned = wanda_mask(W0, sq, 1, sparsity, nm)
    mean, var = X.mean(0), X.var(0, unbiased=False)
    return W0, W0.masked_fill(pruned, 0), pruned, mean, var, sq, X


@pytest.mark.parametrize("nm", [None, NM(2, 4), NM(4, 8)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_plain_reference(nm, seed):
    W0, W, pruned, mean, var, sq, _ = random_case(nm=nm, seed=seed)
    kwargs = dict(nm=nm, cycles=7, threshold=0.05, power=1.0, scale=3.0)
    result = dsnot(W0, W, pruned, mean, var, sq, **kwargs)
    assert result.swaps.sum() > 0
    for i in range(W.shape[0]):
        mask, swaps, error = reference_row(
            W0[i].tolist(), W[i].tolist(), pruned[i].tolist(), mean.tolist(), var.tolist(), sq.tolist(), **kwargs
        )
        assert result.mask[i].tolist() == mask, i
        assert int(result.swaps[i]) == swaps
        assert float(result.error_after[i]) == pytest.approx(error, rel=1e-4, abs=1e-4)


def test_hand_example():
    # one row; inputs have means 1 and variances 1, so ranks equal contributions w0 * mean
    W0 = torch.tensor([[3.0, -1.0, 0.5, 2.0, -4.0, 1.0]])
    pruned = torch.tensor([[True, True, True, False, False, False]])
    W = W0.masked_fill(pruned, 0)
    ones = torch.ones(6)
    # error = 3 - 1 + 0.5 = 2.5 > 0: regrow the largest positive gain (col 0, 3); prune the kept weight with a
    # negative contribution and the lowest Wanda score (col 4, -4): after = 2.5 - 3 - 4 < 0 flips the sign: stop.
    result = dsnot(W0, W, pruned, ones, ones, ones, cycles=5, threshold=0.0)
    assert result.swaps.item() == 0 and result.mask.equal(pruned)
    # with col 4 positive instead, no kept weight has a negative contribution: no swap either
    W0b = W0.clone()
    W0b[0, 4] = 4.0
    result = dsnot(W0b, W0b.masked_fill(pruned, 0), pruned, ones, ones, ones, cycles=5, threshold=0.0)
    assert result.swaps.item() == 0
    # col 4 small (-0.25) and col 0's rank lowered by a huge variance: regrow col 2 (rank 0.5 beats 3e-6), prune
    # col 4: error 2.5 - 0.5 - 0.25 = 1.75. Next, col 0 would be regrown but no kept weight with a negative
    # contribution is left: stop after one swap.
    W0c = torch.tensor([[3.0, -1.0, 0.5, 2.0, -0.25, 1.0]])
    var = torch.tensor([1e6, 1.0, 1.0, 1.0, 1.0, 1.0])
    result = dsnot(W0c, W0c.masked_fill(pruned, 0), pruned, ones, var, ones, cycles=5, threshold=0.0)
    assert result.mask.tolist() == [[True, True, False, False, True, False]]
    assert result.error_before.item() == pytest.approx(2.5)
    assert result.error_after.item() == pytest.approx(1.75)
    assert result.swaps.item() == 1
    # a threshold of 2 stops the row before any swap; 1.8 lets exactly one swap happen
    assert dsnot(W0c, W0c.masked_fill(pruned, 0), pruned, ones, var, ones, threshold=2.5).swaps.item() == 0
    assert dsnot(W0c, W0c.masked_fill(pruned, 0), pruned, ones, var, ones, threshold=1.8).swaps.item() == 1


@pytest.mark.parametrize("nm", [None, NM(2, 4)])
def test_error_never_grows_and_counts_are_exact(nm):
    W0, W, pruned, mean, var, sq, _ = random_case(rows=40, cols=64, nm=nm, seed=5)
    previous = None
    for cycles in range(0, 12):
        result = dsnot(W0, W, pruned, mean, var, sq, nm=nm, cycles=cycles, threshold=0.0)
        # the error proxy is what it claims to be
        new_W = refined_weight(W0, W, pruned, result)
        assert torch.allclose(result.error_after, ((W0 - new_W) * mean).sum(1), atol=1e-4)
        if previous is not None:
            assert (result.error_after.abs() <= previous.abs() + 1e-6).all()
        previous = result.error_after
        assert result.mask.sum(1).equal(pruned.sum(1))  # row sparsity exact
        if nm is not None:
            groups = result.mask.reshape(W.shape[0], -1, nm.m).sum(2)
            assert (groups == nm.n).all()
        assert (new_W[result.mask] == 0).all()
        assert new_W[~result.mask].equal(torch.where(pruned, W0, W)[~result.mask])


def test_reduces_output_error_with_zero_threshold():
    W0, W, pruned, mean, var, sq, X = random_case(rows=64, cols=128, sparsity=0.7, seed=3)
    result = dsnot(W0, W, pruned, mean, var, sq, cycles=200, threshold=0.0, scale=X.shape[0])
    new_W = refined_weight(W0, W, pruned, result)
    before = (X @ (W0 - W).t()).pow(2).sum()
    after = (X @ (W0 - new_W).t()).pow(2).sum()
    assert after < 0.8 * before
    assert result.error_after.abs().mean() < 0.2 * result.error_before.abs().mean()


def test_threshold_stops_rows():
    W0, W, pruned, mean, var, sq, _ = random_case(seed=4)
    big = dsnot(W0, W, pruned, mean, var, sq, threshold=1e9)
    assert big.swaps.sum() == 0 and big.mask.equal(pruned)
    none = dsnot(W0, W, pruned, mean, var, sq, cycles=0, threshold=0.0)
    assert none.mask.equal(pruned)


def test_kept_weights_keep_updated_values():
    """After SparseGPT the kept weights differ from the dense ones; only regrown weights take dense values."""
    W0, W, pruned, mean, var, sq, _ = random_case(seed=6)
    W = W * 1.1  # stands for an update of the kept weights
    result = dsnot(W0, W, pruned, mean, var, sq, threshold=0.0)
    new_W = refined_weight(W0, W, pruned, result)
    regrown = pruned & ~result.mask
    still = ~pruned & ~result.mask
    assert regrown.any()
    assert new_W[regrown].equal(W0[regrown]) and new_W[still].equal(W[still])


# ------------------------------------------------------------------------------- engine, checked from the weights
def _own_linears(layer) -> dict:
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def _walk_view_of_layer(final, dense, index, windows, method, sparsity, pattern):
    """What the walk had in hand at layer ``index``, rebuilt here from the finished model.

    The layer's inputs in the walk are what the already pruned (and refined) earlier layers produce, and its
    statistics come from the layer itself still dense. So: the finished model with layer ``index`` put back to its
    dense weights; hooks on its linears give the input means (over all calibration tokens); pruning only that
    layer of this hybrid with the same method and no refinement gives the weights DSnoT started from.
    Returns ({linear: mean of its inputs}, {linear: weight before DSnoT}, {linear: sum x^2}).
    """
    hybrid = copy.deepcopy(final)
    hybrid.model.layers[index].load_state_dict(dense.model.layers[index].state_dict())
    sums: dict = {}

    def hook(name, args):
        x = args[0].detach().double().reshape(-1, args[0].shape[-1])
        tokens, total, sq = sums.get(name, (0, 0, 0))
        sums[name] = (tokens + x.shape[0], total + x.sum(0), sq + (x * x).sum(0))

    linears = _own_linears(hybrid.model.layers[index])
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: hook(n, a)) for n, m in linears.items()]
    with torch.no_grad():
        for row in windows:
            hybrid(input_ids=row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    others = [f"model.layers.{i}.*" for i in range(len(hybrid.model.layers)) if i != index]
    recipe = Recipe(method=method, sparsity=sparsity, pattern=pattern, exclude=others)
    prune(hybrid, recipe, windows, progress=False)
    means = {n: total / tokens for n, (tokens, total, _) in sums.items()}
    return means, {n: m.weight.detach().clone() for n, m in linears.items()}, {n: sums[n][2] for n in linears}


def _check_refined_model(method, sparsity=0.6, pattern=None, targets=(), threshold=0.0, family="llama"):
    """Prune with DSnoT, then check every linear against DSnoT's definition, recomputed from the weights.

    Per linear: the zeros per row (and per N:M group) equal those before DSnoT; regrown weights take their dense
    value, the other kept ones stay as the method left them; the error proxy e_i = L * sum_j (W0_ij - W_ij) *
    mean(x_j) (L = tokens per window), recomputed from the dense weights, the weights before and after DSnoT and
    the layer's input means, never grows in any row; the report's swaps and mean |e| equal the recomputed ones.
    Returns the total number of swaps counted from the weights.
    """
    windows = torch.randint(0, VOCAB, (3, 16))
    dense = tiny_model(family)
    assert all((m.weight != 0).all() for layer in dense.model.layers for m in _own_linears(layer).values())
    model = tiny_model(family)
    recipe = Recipe(
        method=method,
        sparsity=sparsity,
        pattern=pattern,
        refine=DSnoT(threshold=threshold, targets=tuple(targets), resolve=False),  # the weights DSnoT itself gives
    )
    report = prune(model, recipe, windows, progress=False)
    by_name = {lin["name"]: lin for lin in report.linears}
    L = windows.shape[1]
    total_swaps = 0
    for index, layer in enumerate(model.model.layers):
        means, before, sq = _walk_view_of_layer(model, dense, index, windows, method, sparsity, pattern)
        dense_linears = _own_linears(dense.model.layers[index])
        for name, module in _own_linears(layer).items():
            full = f"model.layers.{index}.{name}"
            W0, W1, W = dense_linears[name].weight.detach(), before[name], module.weight.detach()
            rows, cols = W.shape
            # the weights DSnoT started from are the method's (checked here for the methods without updates)
            if method == "wanda" and pattern is None:
                scores = W0.double().abs() * torch.sqrt(sq[name] / len(windows))
                k = int(cols * sparsity)
                own = torch.zeros_like(W0, dtype=torch.bool).scatter_(1, scores.argsort(1)[:, :k], True)
                assert torch.equal(W1 == 0, own), full
            if method == "magnitude" and pattern is None:
                k = int(W0.numel() * sparsity)
                own = torch.zeros(W0.numel(), dtype=torch.bool)
                own[W0.abs().flatten().argsort()[:k]] = True
                assert torch.equal(W1 == 0, own.reshape(W0.shape)), full
            # counts: per row exactly as before DSnoT (and per N:M group)
            assert torch.equal((W == 0).sum(1), (W1 == 0).sum(1)), full
            if method == "wanda" and pattern is None:
                assert ((W == 0).sum(1) == int(cols * sparsity)).all(), full
            if pattern is not None:
                n, m = map(int, pattern.split(":"))
                assert ((W.reshape(rows, -1, m) == 0).sum(-1) == n).all(), full
            else:
                assert int((W == 0).sum()) == by_name[full]["zeros"] == int((W1 == 0).sum())
            regrown = (W1 == 0) & (W != 0)
            newly = (W1 != 0) & (W == 0)
            assert torch.equal(regrown.sum(1), newly.sum(1)), full  # one swap = one regrown + one pruned
            assert torch.equal(W[regrown], W0[regrown])  # regrown weights take their dense value
            assert torch.equal(W[(W1 != 0) & (W != 0)], W1[(W1 != 0) & (W != 0)])  # the rest as the method left it
            swaps = int(regrown.sum())
            total_swaps += swaps
            if "dsnot" not in by_name[full]["info"]:  # not a target: untouched
                assert targets and swaps == 0, full
                continue
            mean = means[name].reshape(1, -1)
            e_before = L * ((W0.double() - W1.double()) * mean).sum(1)
            e_after = L * ((W0.double() - W.double()) * mean).sum(1)
            assert (e_after.abs() <= e_before.abs() + 1e-6).all(), full
            assert not regrown[e_before.abs() <= threshold].any(), full  # rows already within the threshold: kept
            info = by_name[full]["info"]["dsnot"]
            assert info["swaps"] == swaps, full
            assert info["rows_changed"] == int((regrown.sum(1) > 0).sum()), full
            assert info["mean_abs_error_before"] == pytest.approx(float(e_before.abs().mean()), rel=1e-3, abs=1e-6)
            assert info["mean_abs_error_after"] == pytest.approx(float(e_after.abs().mean()), rel=1e-3, abs=1e-6)
            if swaps:
                assert e_after.abs().sum() < e_before.abs().sum(), full
    return total_swaps


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_engine_refines_every_linear(method):
    assert _check_refined_model(method, sparsity=0.6) > 0


@pytest.mark.parametrize("threshold", [0.0, 0.1])
def test_engine_targets_and_nm(threshold):
    swaps = _check_refined_model("wanda", pattern="2:4", targets=["*.self_attn.*"], threshold=threshold, family="qwen2")
    assert swaps > 0
