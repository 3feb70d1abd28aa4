"""DSnoT: the vectorised refinement against a plain per-row reference, its invariants, and the engine path."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import VOCAB, tiny_model

from secateurs import Recipe, prune
from secateurs.methods import wanda_mask
from secateurs.patterns import NM
from secateurs.refine import dsnot, refined_weight


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


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_engine_refines_every_linear(method):
    windows = torch.randint(0, VOCAB, (3, 16))
    plain = prune(tiny_model("llama"), Recipe(method=method, sparsity=0.6), windows, progress=False)
    model = tiny_model("llama")
    recipe = Recipe(method=method, sparsity=0.6, refine="dsnot", dsnot_threshold=0.0)
    report = prune(model, recipe, windows, progress=False)
    assert [lin["pruned"] for lin in report.linears] == [lin["pruned"] for lin in plain.linears]
    assert all(
        lin["info"]["dsnot"]["mean_abs_error_after"] <= lin["info"]["dsnot"]["mean_abs_error_before"]
        for lin in report.linears
    )
    assert sum(linear["info"]["dsnot"]["swaps"] for linear in report.linears) > 0
    assert report.sparsity == pytest.approx(plain.sparsity)


def test_engine_targets_and_nm():
    model, windows = tiny_model("qwen2"), torch.randint(0, VOCAB, (3, 16))
    recipe = Recipe(method="wanda", pattern="2:4", refine="dsnot", dsnot_targets=["*.self_attn.*"])
    report = prune(model, recipe, windows, progress=False)
    for linear in report.linears:
        assert ("dsnot" in linear["info"]) == (".self_attn." in linear["name"])
    for name, module in model.named_modules():
        if ".layers." in name and isinstance(module, torch.nn.Linear):
            W = module.weight
            assert ((W == 0).reshape(W.shape[0], -1, 4).sum(2) >= 2).all()
