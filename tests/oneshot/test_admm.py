"""ADMM weight update (Boža, 2024) on a fixed mask, and ADMM with gradual mask selection: the maths, checked."""

from __future__ import annotations

import itertools

import pytest
import torch

from secateurs.errors import SecateursError
from secateurs.oneshot.pruners.sparsegpt import SparseGPTUpdate
from secateurs.oneshot.pruners.wanda import wanda_mask
from secateurs.oneshot.select import NM, per_matrix, per_row
from secateurs.oneshot.stage import Target
from secateurs.oneshot.stats import InputStats
from secateurs.oneshot.updates.admm import ADMM, ADMMGradual, _lowest, admm_update

TARGETS = {"50%": Target(0.5), "70%": Target(0.7), "2:4": Target(0.5, NM(2, 4))}


def correlated_problem(rows: int, cols: int, tokens: int, seed: int, outliers: int = 3):
    """Inputs with a random covariance, a shared component and a few outlier features; a random dense weight."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5 + 0.5 * torch.eye(cols)
    X = torch.randn(tokens, cols, generator=g) @ mixing
    X += torch.randn(tokens, 1, generator=g) * torch.randn(1, cols, generator=g)
    X[:, torch.randperm(cols, generator=g)[:outliers]] *= 20.0
    W0 = torch.randn(rows, cols, generator=g)
    return X, W0, stats_of(X)


def stats_of(X: torch.Tensor, windows: int = 4) -> InputStats:
    stats = InputStats()
    for window in X.chunk(windows):
        stats.add(window, {"H_sum", "sq_norm"})
    return stats


def relative_error(X: torch.Tensor, W: torch.Tensor, W0: torch.Tensor) -> float:
    """||X (W - W0)^T||^2 / ||X W0^T||^2, in float64."""
    X, W, W0 = X.double(), W.double(), W0.double()
    return (((X @ (W - W0).T) ** 2).sum() / ((X @ W0.T) ** 2).sum()).item()


def least_squares_on_support(H: torch.Tensor, W0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, solve H_SS w_S = (H w0)_S on the kept support S, in float64; zero on the mask."""
    H, W0 = H.double(), W0.double()
    out = torch.zeros_like(W0)
    for i in range(W0.shape[0]):
        S = ~mask[i]
        out[i, S] = torch.linalg.solve(H[S][:, S], (H @ W0[i])[S])
    return out


def small_problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 12, generator=g) @ torch.randn(12, 12, generator=g)
    W0 = torch.randn(6, 12, generator=g)
    mask = torch.rand(6, 12, generator=g) < 0.5
    return X, W0, mask, stats_of(X)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converges_to_the_exact_least_squares_solution_on_the_support(seed):
    X, W0, mask, stats = small_problem(seed)
    exact = least_squares_on_support(stats.H_sum, W0, mask)
    out, info = admm_update(W0, stats.H_sum, mask, iters=3000, percdamp=0.0)
    assert out.dtype == torch.float32
    assert torch.all(out[mask] == 0)
    assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-4
    assert info["primal_residual"] < 1e-5
    # optimality: the gradient of the reconstruction error vanishes on the support
    gradient = (out.double() - W0.double()) @ stats.H_sum.double()
    assert (gradient[~mask].abs().max() / (W0.double() @ stats.H_sum.double()).abs().max()).item() < 1e-4


def test_damping_is_a_ridge_towards_the_dense_weights():
    """percdamp adds percdamp * mean(diag Hn) = percdamp (unit diagonal) to Hn: H + percdamp * diag(H) originally."""
    X, W0, mask, stats = small_problem(3)
    H = stats.H_sum.double()
    damped = H + 0.1 * torch.diag(torch.diagonal(H))
    exact = least_squares_on_support(damped, W0, mask)
    out, info = admm_update(W0, stats.H_sum, mask, iters=3000, percdamp=0.1)
    assert info["damping"] == pytest.approx(0.1, rel=1e-6)
    assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-4


def test_update_stage_keeps_the_mask_and_its_zeros():
    X, W0, mask, stats = small_problem(4)
    result = ADMM().update(W0, W0 * ~mask, mask, stats, Target(0.5))
    assert torch.equal(result.mask, mask)
    assert torch.all(result.weight[mask] == 0) and not torch.signbit(result.weight[mask]).any()  # +0.0
    assert torch.all(result.weight[~mask] != 0)
    assert result.weight.dtype == W0.dtype and result.weight.shape == W0.shape
    assert set(result.info) == {"iterations", "damping", "dead_inputs", "primal_residual"}
    assert result.info["iterations"] == 20 and result.info["dead_inputs"] == 0


def test_default_settings_are_the_reference_ones():
    assert (ADMM().iters, ADMM().rho, ADMM().percdamp) == (20, 1.0, 0.1)
    gradual = ADMMGradual()
    assert (gradual.iters, gradual.gradual_iters, gradual.rho, gradual.percdamp, gradual.group) == (
        20,
        15,
        1.0,
        0.1,
        "matrix",
    )


@pytest.mark.parametrize("target", list(TARGETS), ids=list(TARGETS))
def test_beats_sparsegpt_on_the_same_mask(target):
    t = TARGETS[target]
    ratios = []
    for seed in range(4):
        X, W0, stats = correlated_problem(32, 64, 512, seed)
        mask = wanda_mask(W0, stats.sq_norm, stats.nsamples, t.sparsity, t.nm)
        sparsegpt = SparseGPTUpdate().update(W0, W0 * ~mask, mask, stats, t)
        admm = ADMM().update(W0, W0 * ~mask, mask, stats, t)
        assert torch.equal(admm.mask, mask) and torch.all(admm.weight[mask] == 0)
        e_sparsegpt = relative_error(X, sparsegpt.weight, W0)
        e_admm = relative_error(X, admm.weight, W0)
        e_exact = relative_error(X, least_squares_on_support(stats.H_sum, W0, mask), W0)
        assert e_exact <= e_admm * (1 + 1e-6)
        assert e_admm <= e_sparsegpt
        ratios.append(e_admm / e_sparsegpt)
    assert sum(ratios) / len(ratios) < 0.95


def test_beats_sparsegpt_with_fewer_tokens_than_inputs():
    """H singular (rank 96 of 128): the damping keeps the W-step well posed."""
    X, W0, stats = correlated_problem(32, 128, 96, seed=7)
    for t in TARGETS.values():
        mask = wanda_mask(W0, stats.sq_norm, stats.nsamples, t.sparsity, t.nm)
        e_sparsegpt = relative_error(X, SparseGPTUpdate().update(W0, W0 * ~mask, mask, stats, t).weight, W0)
        e_admm = relative_error(X, ADMM().update(W0, W0 * ~mask, mask, stats, t).weight, W0)
        assert e_admm < e_sparsegpt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype):
    X, W0, stats = correlated_problem(16, 32, 256, seed=5)
    W0h = W0.to(dtype)
    mask = wanda_mask(W0h, stats.sq_norm, stats.nsamples, 0.5)
    result = ADMM().update(W0h, W0h * ~mask, mask, stats, Target(0.5))
    assert result.weight.dtype == dtype
    assert torch.isfinite(result.weight).all()
    assert torch.all(result.weight[mask] == 0)
    reference, _ = admm_update(W0h.float(), stats.H_sum, mask)
    torch.testing.assert_close(result.weight.float(), reference.to(dtype).float())
    gradual = ADMMGradual().prune(W0h.clone(), stats, Target(0.5))
    assert gradual.weight.dtype == dtype and torch.isfinite(gradual.weight).all()
    assert torch.all(gradual.weight[gradual.mask] == 0)


def test_dead_inputs_keep_their_dense_weight():
    X, W0, stats = correlated_problem(8, 16, 128, seed=6)
    X[:, 3] = 0.0
    stats = stats_of(X)
    mask = wanda_mask(W0, stats.sq_norm, stats.nsamples, 0.5)
    result = ADMM().update(W0, W0 * ~mask, mask, stats, Target(0.5))
    assert result.info["dead_inputs"] == 1
    assert torch.isfinite(result.weight).all() and torch.all(result.weight[mask] == 0)
    kept = ~mask[:, 3]
    torch.testing.assert_close(result.weight[kept, 3], W0[kept, 3], rtol=1e-5, atol=1e-6)


def test_lowest_selection_matches_the_stable_sort_of_select():
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        scores = torch.randint(0, 4, (7, 13), generator=g).float()  # many ties
        for sparsity in (0.0, 0.1, 0.5, 0.77, 0.99):
            flat = _lowest(scores.reshape(-1), int(scores.numel() * sparsity)).reshape(scores.shape)
            assert torch.equal(flat, per_matrix(scores, sparsity))
            assert torch.equal(_lowest(scores, int(13 * sparsity)), per_row(scores, sparsity))


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_gradual_unstructured_counts_are_exact(sparsity):
    X, W0, stats = correlated_problem(24, 40, 256, seed=8)
    per_mat = ADMMGradual().prune(W0.clone(), stats, Target(sparsity))
    assert int(per_mat.mask.sum()) == int(24 * 40 * sparsity)
    assert torch.all(per_mat.weight[per_mat.mask] == 0)
    rows = ADMMGradual(group="row").prune(W0.clone(), stats, Target(sparsity))
    assert torch.all(rows.mask.sum(1) == int(40 * sparsity))
    assert torch.all(rows.weight[rows.mask] == 0)


@pytest.mark.parametrize("nm", [NM(2, 4), NM(4, 8), NM(1, 3)], ids=str)
def test_gradual_n_of_m_counts_are_exact(nm):
    X, W0, stats = correlated_problem(24, 48, 256, seed=9)
    for gradual_iters in (15, 1, 0):
        result = ADMMGradual(gradual_iters=gradual_iters).prune(W0.clone(), stats, Target(nm.sparsity, nm))
        groups = result.mask.reshape(24, 48 // nm.m, nm.m).sum(-1)
        assert torch.all(groups == nm.n)
        assert torch.all(result.weight[result.mask] == 0)


def test_gradual_schedule_rises_to_the_target():
    from secateurs.oneshot.updates.admm import _cubic

    steps = [_cubic(0.6, t, 15) for t in range(1, 16)]
    assert all(a < b for a, b in itertools.pairwise(steps))
    assert steps[-1] == 0.6 and steps[0] == pytest.approx(0.6 * (1 - (14 / 15) ** 3))


@pytest.mark.parametrize("target", list(TARGETS), ids=list(TARGETS))
def test_gradual_beats_wanda_mask_with_admm_update(target):
    t = TARGETS[target]
    for seed in range(3):
        X, W0, stats = correlated_problem(32, 64, 512, seed)
        mask = wanda_mask(W0, stats.sq_norm, stats.nsamples, t.sparsity, t.nm)
        e_wanda_admm = relative_error(X, ADMM().update(W0, W0 * ~mask, mask, stats, t).weight, W0)
        # per row: the same count as Wanda's mask; per matrix (the default): floor(rows * cols * s), at least as many
        rows = ADMMGradual(group="row").prune(W0.clone(), stats, t)
        assert int(rows.mask.sum()) == int(mask.sum())
        assert relative_error(X, rows.weight, W0) <= e_wanda_admm
        gradual = ADMMGradual().prune(W0.clone(), stats, t)
        assert int(gradual.mask.sum()) >= int(mask.sum())
        assert relative_error(X, gradual.weight, W0) <= e_wanda_admm


def test_settings_are_checked():
    with pytest.raises(SecateursError, match="iters"):
        ADMM(iters=0)
    with pytest.raises(SecateursError, match="rho"):
        ADMM(rho=0.0)
    with pytest.raises(SecateursError, match="percdamp"):
        ADMM(percdamp=-0.1)
    with pytest.raises(SecateursError, match="gradual_iters"):
        ADMMGradual(iters=10, gradual_iters=15)
    with pytest.raises(SecateursError, match="group"):
        ADMMGradual(group="column")
    assert ADMM.from_options({"iters": 50}).iters == 50
    assert ADMMGradual.from_options(ADMMGradual(group="row").options()).group == "row"


def test_gradual_rejects_a_width_not_divisible_by_m():
    X, W0, stats = correlated_problem(4, 10, 64, seed=0)
    with pytest.raises(SecateursError, match="divisible"):
        ADMMGradual().prune(W0.clone(), stats, Target(0.5, NM(2, 4)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    X, W0, stats = correlated_problem(64, 128, 1024, seed=1)
    mask = wanda_mask(W0, stats.sq_norm, stats.nsamples, 0.5)
    cpu = ADMM().update(W0, W0 * ~mask, mask, stats, Target(0.5))
    cuda_stats = InputStats(stats.nsamples, stats.ntokens, stats.sq_norm.cuda(), stats.H_sum.cuda())
    gpu = ADMM().update(W0.cuda(), (W0 * ~mask).cuda(), mask.cuda(), cuda_stats, Target(0.5))
    assert gpu.weight.is_cuda and torch.all(gpu.weight[mask.cuda()] == 0)
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-3, atol=1e-4)
    gradual = ADMMGradual().prune(W0.cuda(), cuda_stats, Target(0.5, NM(2, 4)))
    assert torch.all(gradual.mask.reshape(64, 32, 4).sum(-1) == 2)
