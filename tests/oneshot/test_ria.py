"""RIA: scores against a double loop, exact counts per comparison group, N:M, half dtypes, channel permutation."""

from __future__ import annotations

import itertools
import json
import math
import sys

import pytest
import torch

from secateurs.errors import SecateursError
from secateurs.oneshot.pruners.ria import (
    RIA,
    assignment_rounds,
    channel_permutation,
    kept_score,
    reallocation,
    ria_scores,
    swap_values,
)
from secateurs.oneshot.select import NM
from secateurs.oneshot.stage import SUM_SQUARES, Target
from secateurs.oneshot.stats import InputStats


def make_inputs(cols: int, seed: int = 0, windows: int = 3, seqlen: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(cols, generator=g) * 3 + 0.1  # features of very different size
    return torch.randn(windows, seqlen, cols, generator=g) * scale


def make_stats(x: torch.Tensor) -> InputStats:
    stats = InputStats()
    for window in x.split(2):  # two batches, so the sums have to add up
        stats.add(window, {SUM_SQUARES})
    return stats


def make_weight(rows: int, cols: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(rows, cols, generator=g).to(dtype)


def loop_scores(W: torch.Tensor, x: torch.Tensor, a: float) -> list[list[float]]:
    """Brute force in plain Python: (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j|| ** a."""
    w = W.double().tolist()
    xs = x.double().tolist()  # [windows][tokens][cols]
    rows, cols = len(w), len(w[0])
    norms = []
    for j in range(cols):
        per_window = [sum(tok[j] ** 2 for tok in window) for window in xs]  # ||X_j||^2 of each window
        norms.append(math.sqrt(sum(per_window) / len(per_window)))
    out = []
    for i in range(rows):
        row_sum = sum(abs(w[i][k]) for k in range(cols))
        line = []
        for j in range(cols):
            col_sum = sum(abs(w[k][j]) for k in range(rows))
            rel = (abs(w[i][j]) / col_sum if col_sum else 0.0) + (abs(w[i][j]) / row_sum if row_sum else 0.0)
            line.append(rel * norms[j] ** a)
        out.append(line)
    return out


def is_nm(mask: torch.Tensor, nm: NM) -> bool:
    rows, cols = mask.shape
    if cols % nm.m:
        return False
    return bool((mask.reshape(rows, cols // nm.m, nm.m).sum(-1) == nm.n).all())


def lowest_set(values: list[float], k: int) -> set[int]:
    return {i for _, i in sorted((v, i) for i, v in enumerate(values))[:k]}


# ---------------------------------------------------------------- scores


@pytest.mark.parametrize("a", [0.5, 1.0, 0.0, 2.0])
def test_scores_match_a_double_loop(a):
    x = make_inputs(8, seed=1)
    W = make_weight(5, 8, seed=1)
    stats = make_stats(x)
    assert stats.nsamples == 3
    got = ria_scores(W, stats.sq_norm, stats.nsamples, a)
    assert got.dtype == torch.float32 and got.shape == (5, 8)
    torch.testing.assert_close(got.double(), torch.tensor(loop_scores(W, x, a), dtype=torch.float64), rtol=1e-5, atol=0)


def test_activation_norm_is_the_reference_running_mean():
    """The reference keeps scaler_row as a running mean over windows of ||X_j||^2; sq_norm / nsamples is that."""
    x = make_inputs(6, seed=2, windows=4, seqlen=7)
    running, seen = torch.zeros(6), 0
    for window in x:  # one window per forward call, as the reference feeds the layer
        running *= seen / (seen + 1)
        seen += 1
        running += (window.t() ** 2).sum(dim=1) / seen
    stats = make_stats(x)
    W = make_weight(3, 6, seed=2)
    A = W.abs()
    expected = (A / A.sum(0, keepdim=True) + A / A.sum(1, keepdim=True)) * torch.sqrt(running).reshape(1, -1) ** 0.5
    torch.testing.assert_close(ria_scores(W, stats.sq_norm, stats.nsamples), expected, rtol=1e-5, atol=0)


def test_zero_rows_and_columns_score_zero_not_nan():
    x = make_inputs(8, seed=3)
    W = make_weight(5, 8, seed=3)
    W[2] = 0
    W[:, 5] = 0
    stats = make_stats(x)
    got = ria_scores(W, stats.sq_norm, stats.nsamples)
    assert torch.isfinite(got).all()
    assert (got[2] == 0).all() and (got[:, 5] == 0).all()
    torch.testing.assert_close(
        got.double(), torch.tensor(loop_scores(W, x, 0.5), dtype=torch.float64), rtol=1e-5, atol=0
    )


# ---------------------------------------------------------------- unstructured


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.55, 0.9])
def test_unstructured_prunes_the_lowest_of_the_whole_matrix(sparsity):
    rows, cols = 6, 10
    x = make_inputs(cols, seed=4)
    W = make_weight(rows, cols, seed=4)
    out = RIA().prune(W.clone(), make_stats(x), Target(sparsity))
    flat_scores = [v for line in loop_scores(W, x, 0.5) for v in line]
    k = int(rows * cols * sparsity)
    assert out.mask.dtype == torch.bool and out.mask.shape == (rows, cols)
    assert int(out.mask.sum()) == k
    pruned = {i for i, p in enumerate(out.mask.flatten().tolist()) if p}
    assert pruned == lowest_set(flat_scores, k)
    assert torch.equal(out.weight, W)


def test_unstructured_group_is_the_matrix_not_the_row():
    rows, cols = 6, 10
    x = make_inputs(cols, seed=5)
    W = make_weight(rows, cols, seed=5)
    W[0] *= 0.01  # row 0 is uniformly small, but row normalisation makes that irrelevant for the second term only
    mask = RIA().prune(W, make_stats(x), Target(0.5)).mask
    assert int(mask.sum()) == 30
    assert len(set(mask.sum(1).tolist())) > 1  # rows lose different counts: one threshold for the whole matrix


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75])
def test_unstructured_per_row(sparsity):
    rows, cols = 5, 12
    x = make_inputs(cols, seed=6)
    W = make_weight(rows, cols, seed=6)
    mask = RIA(per_row=True).prune(W, make_stats(x), Target(sparsity)).mask
    scores = loop_scores(W, x, 0.5)
    k = int(cols * sparsity)
    for i in range(rows):
        assert int(mask[i].sum()) == k
        assert {j for j in range(cols) if mask[i, j]} == lowest_set(scores[i], k)


# ---------------------------------------------------------------- N:M


def test_nm_checker_rejects_trivial_masks():
    assert not is_nm(torch.ones(3, 8, dtype=torch.bool), NM(2, 4))
    assert not is_nm(torch.zeros(3, 8, dtype=torch.bool), NM(2, 4))
    assert is_nm(torch.tensor([[True, False, True, False]]), NM(2, 4))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8)])
def test_nm_prunes_the_n_lowest_of_every_group(n, m):
    rows, cols = 5, 16
    nm = NM(n, m)
    x = make_inputs(cols, seed=7)
    W = make_weight(rows, cols, seed=7)
    out = RIA().prune(W.clone(), make_stats(x), Target(nm.sparsity, nm))
    assert is_nm(out.mask, nm)
    scores = loop_scores(W, x, 0.5)
    for i in range(rows):
        for g0 in range(0, cols, m):
            chosen = {j - g0 for j in range(g0, g0 + m) if out.mask[i, j]}
            assert chosen == lowest_set(scores[i][g0 : g0 + m], n)
    assert out.info == {}


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("target", [Target(0.5), Target(0.6), Target(0.5, NM(2, 4)), Target(0.5, NM(4, 8))])
def test_half_precision_weights(dtype, target):
    rows, cols = 12, 32
    x = make_inputs(cols, seed=8)
    W = make_weight(rows, cols, seed=8, dtype=dtype)
    stats = make_stats(x)
    for pruner in (RIA(), RIA(per_row=True), RIA(permute=True)):
        out = pruner.prune(W.clone(), stats, target)
        assert out.weight.dtype == dtype and out.weight.shape == W.shape
        if target.nm is None:
            per_group = cols if pruner.per_row else rows * cols
            assert int(out.mask.sum()) == int(per_group * target.sparsity) * (rows if pruner.per_row else 1)
        else:
            assert int(out.mask.sum()) == rows * cols * target.nm.n // target.nm.m
        reference = pruner.prune(W.float(), stats, target)  # the same values in fp32 give the same mask
        assert torch.equal(out.mask, reference.mask)
        json.dumps(out.info)


# ---------------------------------------------------------------- channel permutation


def test_reallocation_spreads_the_bands_over_the_groups():
    # column totals 0..7 in the order given: ranked ascending s0..s7 = columns 3, 6, 0, 7, 1, 4, 2, 5
    totals = torch.tensor([2.0, 4.0, 6.0, 0.0, 5.0, 7.0, 1.0, 3.0])
    scores = totals.reshape(1, -1).repeat(2, 1)
    s = [3, 6, 0, 7, 1, 4, 2, 5]
    order = reallocation(scores, NM(2, 4))
    # band p gives position p of each group; odd bands reversed
    assert order.tolist() == [s[0], s[3], s[4], s[7], s[1], s[2], s[5], s[6]]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8)])
def test_swap_values_are_the_exact_kept_scores(n, m):
    nm = NM(n, m)
    g = torch.Generator().manual_seed(9)
    grouped = torch.rand(4, 5, m, generator=g)
    for p in range(m):
        value = swap_values(grouped, p, nm)
        for h in range(5):
            for giver in range(5):
                group = grouped[:, h].clone()
                group[:, p] = grouped[:, giver, p]
                direct = float(group.topk(m - n, dim=-1).values.double().sum())
                assert value[h, giver].item() == pytest.approx(direct, rel=1e-6)


def permuted_groups_ok(mask: torch.Tensor, scores: torch.Tensor, order: torch.Tensor, nm: NM) -> bool:
    """mask[:, order] is N:M and prunes the N lowest scores of each permuted group."""
    if sorted(order.tolist()) != list(range(scores.shape[1])):
        return False
    pm, ps = mask[:, order], scores[:, order]
    if not is_nm(pm, nm):
        return False
    rows, cols = ps.shape
    groups = ps.reshape(rows, cols // nm.m, nm.m)
    pruned_max = torch.where(pm.reshape(groups.shape), groups, -torch.inf).amax(-1)
    kept_min = torch.where(pm.reshape(groups.shape), torch.inf, groups).amin(-1)
    return bool((pruned_max <= kept_min).all())


def kept_of(mask: torch.Tensor, scores: torch.Tensor) -> float:
    return float((scores.double() * (~mask).double()).sum())


@pytest.mark.parametrize(
    "rows,cols,n,m,blocks",
    [(6, 16, 2, 4, 1), (5, 24, 2, 4, 1), (4, 16, 4, 8, 1), (7, 12, 1, 4, 1), (8, 48, 2, 4, 3), (3, 12, 2, 4, 2)],
)
@pytest.mark.parametrize("seed", range(4))
def test_permutation_keeps_at_least_the_unpermuted_score(rows, cols, n, m, blocks, seed):
    nm = NM(n, m)
    x = make_inputs(cols, seed=seed + 10)
    W = make_weight(rows, cols, seed=seed + 10)
    stats = make_stats(x)
    scores = ria_scores(W, stats.sq_norm, stats.nsamples)
    plain = RIA().prune(W, stats, Target(nm.sparsity, nm))
    out = RIA(permute=True, permute_blocks=blocks).prune(W, stats, Target(nm.sparsity, nm))
    info = out.info["permutation"]
    order = torch.tensor(info["order"])
    assert permuted_groups_ok(out.mask, scores, order, nm)
    assert int(out.mask.sum()) == rows * cols * n // m
    assert kept_of(out.mask, scores) >= kept_of(plain.mask, scores) - 1e-9
    assert info["kept_score"] == pytest.approx(kept_of(out.mask, scores), rel=1e-9)
    assert info["kept_score_unpermuted"] == pytest.approx(kept_of(plain.mask, scores), rel=1e-9)
    assert info["columns_moved"] == int((order != torch.arange(cols)).sum())
    json.dumps(out.info)


def all_permutation_best(scores: torch.Tensor, nm: NM) -> float:
    rows, cols = scores.shape
    perms = torch.tensor(list(itertools.permutations(range(cols))))
    grouped = scores.double()[:, perms].reshape(rows, len(perms), cols // nm.m, nm.m)
    return float(grouped.topk(nm.m - nm.n, dim=-1).values.sum(dim=(0, 2, 3)).max())


def test_permutation_strictly_helps_and_finds_the_best_of_all_8_column_orders():
    """Four strong input columns side by side: unpermuted, 2:4 must drop two of them in every row.

    Every input has the same norm, so the strong columns stay the four best of each row; any order putting two of
    them in each group keeps all four, which is the best possible, and the permutation must find one.
    """
    nm = NM(2, 4)
    g = torch.Generator().manual_seed(11)
    W = (torch.rand(3, 8, generator=g) * 0.2 + 0.05) * torch.where(torch.rand(3, 8, generator=g) < 0.5, -1, 1)
    W[:, :4] *= 8.0  # strong columns 0..3, all in the first group
    x = torch.ones(2, 3, 8) * torch.where(torch.rand(2, 3, 8, generator=g) < 0.5, -1.5, 1.5)
    stats = make_stats(x)
    scores = ria_scores(W, stats.sq_norm, stats.nsamples)
    plain = RIA().prune(W, stats, Target(0.5, nm))
    out = RIA(permute=True).prune(W, stats, Target(0.5, nm))
    best = all_permutation_best(scores, nm)
    assert kept_of(out.mask, scores) > kept_of(plain.mask, scores) + 1e-3
    assert kept_of(out.mask, scores) == pytest.approx(best, rel=1e-9)
    order = torch.tensor(out.info["permutation"]["order"])
    assert permuted_groups_ok(out.mask, scores, order, nm)
    assert not is_nm(out.mask, nm)  # in the original order the mask is not 2:4 (two strong columns per group kept)
    assert out.info["permutation"]["columns_moved"] > 0


@pytest.mark.parametrize("seed", range(6))
def test_permutation_is_between_identity_and_the_best_of_all_orders(seed):
    nm = NM(2, 4)
    x = make_inputs(8, seed=seed + 20)
    W = make_weight(4, 8, seed=seed + 20)
    stats = make_stats(x)
    scores = ria_scores(W, stats.sq_norm, stats.nsamples)
    order, info = channel_permutation(scores, nm)
    assert sorted(order.tolist()) == list(range(8))
    kept = kept_score(scores[:, order], nm)
    assert kept_score(scores, nm) - 1e-9 <= kept <= all_permutation_best(scores, nm) + 1e-9
    assert info["kept_score"] == pytest.approx(kept, rel=1e-12)


def test_assignment_rounds_never_lose_score():
    nm = NM(2, 4)
    g = torch.Generator().manual_seed(12)
    scores = torch.rand(6, 32, generator=g) ** 3
    for start in (torch.arange(32), torch.randperm(32, generator=g), reallocation(scores, nm)):
        after = assignment_rounds(scores, start, nm)
        assert sorted(after.tolist()) == list(range(32))
        assert kept_score(scores[:, after], nm) >= kept_score(scores[:, start], nm) - 1e-9


def test_permute_is_ignored_for_unstructured_and_one_group():
    x = make_inputs(12, seed=13)
    W = make_weight(4, 12, seed=13)
    stats = make_stats(x)
    plain = RIA().prune(W, stats, Target(0.5))
    permuted = RIA(permute=True).prune(W, stats, Target(0.5))
    assert torch.equal(plain.mask, permuted.mask) and permuted.info == {}
    x4 = make_inputs(4, seed=13)
    W4 = make_weight(4, 4, seed=13)
    out = RIA(permute=True).prune(W4, make_stats(x4), Target(0.5, NM(2, 4)))
    assert out.info["permutation"]["order"] == [0, 1, 2, 3] and out.info["permutation"]["start"] == "none"


def test_long_permutations_are_summarised(monkeypatch):
    import secateurs.oneshot.pruners.ria as ria

    monkeypatch.setattr(ria, "LIST_ORDER_UP_TO", 8)
    x = make_inputs(16, seed=14)
    W = make_weight(4, 16, seed=14)
    info = RIA(permute=True).prune(W, make_stats(x), Target(0.5, NM(2, 4))).info["permutation"]
    assert "order" not in info and {"kept_score", "kept_score_unpermuted", "columns_moved", "start"} <= set(info)


# ---------------------------------------------------------------- the config


def test_config():
    assert RIA.name == "ria" and RIA.kind == "pruner" and RIA.needs == frozenset({SUM_SQUARES})
    assert RIA.summary and "\n" not in RIA.summary
    assert RIA().options() == {"a": 0.5, "per_row": False, "permute": False, "permute_blocks": 1}
    assert RIA.from_options({"a": 1.0, "permute": True}) == RIA(a=1.0, permute=True)
    for bad in ({"a": -1.0}, {"a": float("nan")}, {"permute_blocks": 0}):
        with pytest.raises(SecateursError, match="^ria: "):
            RIA(**bad)
    with pytest.raises(SecateursError, match="unknown setting"):
        RIA.from_options({"alpha": 1})


def test_missing_scipy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(SecateursError, match="scipy"):
        RIA(permute=True)
    RIA()  # no permutation: scipy is not needed


def test_missing_statistics_is_a_clear_error():
    with pytest.raises(SecateursError, match="calibration"):
        RIA().prune(make_weight(2, 4), InputStats(), Target(0.5))
