"""The maths of each method, checked against brute force or closed forms on small layers."""

from __future__ import annotations

import logging

import pytest
import torch

from secateurs.errors import SecateursError
from secateurs.oneshot.pruners.magnitude import magnitude_mask
from secateurs.oneshot.pruners.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from secateurs.oneshot.pruners.wanda import wanda_mask, wanda_scores
from secateurs.oneshot.select import NM, n_of_m, parse_nm, per_matrix, per_row
from secateurs.oneshot.stats import InputStats


def _correlated_inputs(samples=8, tokens=32, cols=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) * 0.3 + torch.eye(cols)
    # features of very different magnitude, like LLM activations, in no particular order
    scale = torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    return (torch.randn(samples, tokens, cols, generator=g) @ mixing) * scale


def _stats(X, hessian=True):
    stats = InputStats()
    for sample in X:  # one sequence at a time, as the engine's hooks see them
        stats.add(sample.unsqueeze(0), {"sq_norm", "H_sum"} if hessian else {"sq_norm"})
    return stats


def test_wanda_scores_match_brute_force():
    X = _correlated_inputs(samples=5, tokens=7, cols=12)
    W = torch.randn(6, 12)
    stats = _stats(X, hessian=False)
    assert stats.nsamples == 5
    expected = torch.empty_like(W)
    for i in range(6):
        for j in range(12):
            mean_sq_norm = sum(float((X[s, :, j] ** 2).sum()) for s in range(5)) / 5
            expected[i, j] = abs(W[i, j]) * mean_sq_norm**0.5
    torch.testing.assert_close(wanda_scores(W, stats.sq_norm, stats.nsamples), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.99])
def test_wanda_prunes_lowest_scores_per_row(sparsity):
    X = _correlated_inputs(cols=20)
    W = torch.randn(9, 20)
    stats = _stats(X, hessian=False)
    mask = wanda_mask(W, stats.sq_norm, stats.nsamples, sparsity)
    k = int(20 * sparsity)
    assert (mask.sum(1) == k).all()
    scores = wanda_scores(W, stats.sq_norm, stats.nsamples)
    for i in range(9):
        lowest = set(torch.argsort(scores[i])[:k].tolist())
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == lowest


def test_magnitude_one_threshold_per_matrix():
    W = torch.randn(10, 16)
    W[0] *= 100  # a row of large weights keeps all of them under a single matrix threshold
    mask = magnitude_mask(W, 0.5)
    assert mask.sum() == 80
    assert mask[0].sum() == 0
    assert W.abs()[mask].max() <= W.abs()[~mask].min()


def test_selectors_break_ties_exactly():
    scores = torch.zeros(3, 8)
    assert (per_row(scores, 0.5).sum(1) == 4).all()
    assert per_matrix(scores, 0.5).sum() == 12
    assert (n_of_m(scores, NM(2, 4)).reshape(3, 2, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("pattern", ["1:4", "2:4", "4:8", "3:4"])
def test_nm_groups(pattern):
    nm = parse_nm(pattern)
    W = torch.randn(5, 32)
    mask = n_of_m(W.abs(), nm)
    groups = mask.reshape(5, -1, nm.m)
    assert (groups.sum(-1) == nm.n).all()
    # within each group the pruned are the smallest
    absW = W.abs().reshape(5, -1, nm.m)
    assert (absW.masked_fill(~groups, -1).amax(-1) <= absW.masked_fill(groups, float("inf")).amin(-1)).all()


@pytest.mark.parametrize("bad", ["2:2", "0:4", "5:4", "2-4", "a:b", "2:4:8", ""])
def test_malformed_patterns(bad):
    with pytest.raises(SecateursError):
        parse_nm(bad)


def test_nm_width_error():
    with pytest.raises(SecateursError, match="divisible by 4"):
        n_of_m(torch.randn(2, 10), NM(2, 4))


def _output_error(X, W, W_new):
    X2 = X.reshape(-1, X.shape[-1])
    return float(((X2 @ W.t() - X2 @ W_new.t()) ** 2).sum())


@pytest.mark.parametrize("sparsity,pattern", [(0.5, None), (0.7, None), (None, "2:4")])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(sparsity, pattern):
    X = _correlated_inputs(samples=16, tokens=32, cols=64)
    W = torch.randn(48, 64)
    stats = _stats(X)
    nm = parse_nm(pattern) if pattern else None
    W_sgpt, mask, info = sparsegpt_prune(W, stats.H_sum, stats.nsamples, sparsity, nm, blocksize=16)
    assert info.retries == 0
    W_wanda = W.masked_fill(wanda_mask(W, stats.sq_norm, stats.nsamples, sparsity, nm), 0)
    W_mag = W.masked_fill(magnitude_mask(W, sparsity, nm), 0)
    e_sgpt, e_wanda, e_mag = (_output_error(X, W, w) for w in (W_sgpt, W_wanda, W_mag))
    assert e_sgpt < e_wanda < e_mag
    assert torch.equal(W_sgpt == 0, mask)
    if nm:
        assert (mask.reshape(48, -1, nm.m).sum(-1) == nm.n).all()
    else:
        assert mask.sum() == int(48 * 64 * sparsity)


@pytest.mark.parametrize("column", [0, 3, 10])
def test_sparsegpt_single_pruned_weight_is_the_obs_update(column):
    """Prune one weight of one row: the other weights move by the optimal brain surgeon closed form.

    Columns left of the pruned one are already fixed, so the update uses the inverse of the damped Hessian
    restricted to columns >= c:  delta = -w_c / [H_F^-1]_cc * [H_F^-1]_c,:.
    """
    cols = 12
    X = _correlated_inputs(samples=6, tokens=16, cols=cols)
    stats = _stats(X)
    H = stats.H_sum * 2 / stats.nsamples
    H = H + 0.01 * torch.diag(H).mean() * torch.eye(cols)
    U, _, _ = inverse_hessian_factor(stats.H_sum * 2 / stats.nsamples, 0.01)
    W = torch.randn(1, cols) + 3.0
    W[0, column] = 1e-3 * U[column, column]  # by far the lowest w^2 / U_cc^2: the one pruned
    W_new, mask, _ = sparsegpt_prune(W, stats.H_sum, stats.nsamples, 1 / cols, blocksize=cols)
    assert torch.nonzero(mask).tolist() == [[0, column]]
    Hinv_F = torch.linalg.inv(H[column:, column:].double())
    expected = W.double().clone()
    expected[0, column:] -= W[0, column].double() / Hinv_F[0, 0] * Hinv_F[0]
    torch.testing.assert_close(W_new.double(), expected, rtol=1e-4, atol=1e-6)
    assert W_new[0, column] == 0


def test_sparsegpt_lazy_block_updates_equal_eager_updates():
    """With N:M the mask does not depend on the block size, so neither may the result."""
    X = _correlated_inputs(samples=8, tokens=16, cols=32)
    stats = _stats(X)
    W = torch.randn(10, 32)
    results = [sparsegpt_prune(W, stats.H_sum, stats.nsamples, nm=NM(2, 4), blocksize=b) for b in (4, 8, 32, 128)]
    W_ref, mask_ref, _ = results[0]
    assert (mask_ref.reshape(10, -1, 4).sum(-1) == 2).all()  # exactly 2 of every 4
    assert torch.equal(W_ref == 0, mask_ref)  # the kept weights are all non-zero ...
    assert not torch.allclose(W_ref[~mask_ref], W[~mask_ref])  # ... and updated (not just masked)
    for W_new, mask, _ in results[1:]:
        assert torch.equal(mask, mask_ref)
        torch.testing.assert_close(W_new, W_ref, rtol=1e-4, atol=1e-5)


def test_sparsegpt_raises_damping_when_cholesky_fails(caplog):
    H_sum = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # indefinite: Cholesky fails until damped enough
    W = torch.randn(3, 2)
    with caplog.at_level(logging.WARNING):
        W_new, mask, info = sparsegpt_prune(W, H_sum, 2, 0.5)
    assert info.retries > 0 and info.damping > 0.01
    assert "damping raised" in caplog.text
    assert torch.isfinite(W_new).all() and mask.sum() == 3
    assert torch.equal(W_new == 0, mask)


def test_sparsegpt_dead_inputs_get_zero_weight():
    X = _correlated_inputs(cols=8)
    X[..., 3] = 0
    stats = _stats(X)
    W_new, mask, info = sparsegpt_prune(torch.randn(4, 8) + 1, stats.H_sum, stats.nsamples, 0.25)
    assert info.dead_inputs == 1
    assert (W_new[:, 3] == 0).all()
    # the dead column's zeros count towards floor(rows * cols * s) = 8: exactly 8 zeros, the dead 4 among them
    assert mask[:, 3].all() and mask.sum() == 8
    assert torch.equal(W_new == 0, mask)


@pytest.mark.parametrize("blocksize", [7, 16, 128])
@pytest.mark.parametrize("sparsity", [0.37, 0.5, 0.83])
def test_sparsegpt_unstructured_count_is_exact_across_blocks(sparsity, blocksize):
    """Each block takes its share of floor(rows * cols * s) by cumulative rounding: the total is exact even when
    the block size does not divide the width, and every kept weight stays non-zero."""
    X = _correlated_inputs(samples=4, tokens=16, cols=50)
    stats = _stats(X)
    W = torch.randn(9, 50)
    W_new, mask, _ = sparsegpt_prune(W, stats.H_sum, stats.nsamples, sparsity, blocksize=blocksize)
    assert int(mask.sum()) == int(9 * 50 * sparsity)
    assert torch.equal(W_new == 0, mask)
    assert torch.isfinite(W_new).all()
    assert len(set(mask.sum(1).tolist())) > 1  # one choice over the whole block, not per row


def test_input_stats_sum_over_batches_equals_one_pass():
    X = _correlated_inputs(samples=6, cols=10)
    one = InputStats()
    one.add(X, {"sq_norm", "H_sum"})
    split = _stats(X)
    assert one.nsamples == split.nsamples == 6
    torch.testing.assert_close(one.H_sum, split.H_sum, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(one.sq_norm, torch.diag(one.H_sum), rtol=1e-5, atol=1e-3)
