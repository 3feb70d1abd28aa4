"""DSnoT's reference variant against a per-row restatement of the reference algorithm (github.com/zyxxmu/DSnoT,
``lib/prune.py::prune_DSnoT``), on cases where it differs from the secateurs variant; the per-window variance; the
variant's defaults; SparseGPT's score; and SparseGPT + DSnoT solving the kept weights again for the refined mask."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from secateurs.oneshot.pruners.sparsegpt import SparseGPT, SparseGPTUpdate, sparsegpt_prune, sparsegpt_scores
from secateurs.oneshot.pruners.wanda import Wanda, wanda_mask
from secateurs.oneshot.refiners.dsnot import DSnoT, dsnot, dsnot_reference
from secateurs.oneshot.select import NM, n_of_m
from secateurs.oneshot.stage import GRAM, MEAN, SUM_SQUARES, WINDOW_SQUARES, Target
from secateurs.oneshot.stats import InputStats
from secateurs.oneshot.walk import LinearStages, run_stages

INF = float("inf")


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def restated_row(w, pruned, mean, var, sq, *, nm, score, cycles, threshold, power, sign_check):
    """One row of the reference's prune_DSnoT, restated with lists: its sorted index lists and two pointers each."""
    cols = len(w)
    metric = [w[j] * mean[j] for j in range(cols)]  # DSnoT_metric: W * (per-window sum of x)
    pruned = list(pruned)
    error = sum(metric[j] for j in range(cols) if pruned[j])
    sign0 = _sign(error)
    regrow_metric = [metric[j] / (var[j] ** power if power else 1.0) if pruned[j] else 0.0 for j in range(cols)]
    regrow = sorted(range(cols), key=lambda j: regrow_metric[j])  # ascending, stable
    r_ptr, r_step = [0, cols - 1], [1, -1]
    if nm is None:
        wanda = [abs(w[j]) * math.sqrt(sq[j]) for j in range(cols)]
        kept = sorted((j for j in range(cols) if not pruned[j]), key=lambda j: wanda[j])
        # return_reorder_indice: negative contributions keep their order, positive ones are reversed, at the end
        prune_list = [j for j in kept if metric[j] < 0] + [j for j in kept if metric[j] > 0][::-1]
        p_ptr = [0, len(prune_list) - 1]
    else:
        initial = [INF if pruned[j] else score[j] for j in range(cols)]
    update, swaps = True, 0
    for _ in range(cycles):
        if not update:
            break
        side = 1 if error > 0 else 0
        j = regrow[r_ptr[side]]
        r_ptr[side] += r_step[side]
        if nm is None:
            p_side = 1 if error < 0 else 0
            k = prune_list[p_ptr[p_side]]
            p_ptr[p_side] += r_step[p_side]
        else:
            start = j - j % nm.m
            block = initial[start : start + nm.m]
            k = start + block.index(min(block))
            initial[k] = INF
        after = error + metric[k] - metric[j]
        update = update and abs(error) > threshold
        if sign_check:
            update = update and _sign(after) == sign0
        if update:
            pruned[k], pruned[j] = True, False
            error = after
            swaps += 1
    return pruned, swaps, error


def _problem(seed, rows=6, cols=64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mean = torch.randn(cols, generator=g) * 0.5 + 0.2  # biased inputs: large errors, many swaps
    var = torch.rand(cols, generator=g) + 0.1
    sq = torch.rand(cols, generator=g) * 4 + 0.5
    return W, mean, var, sq


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sign_check", [None, True])
def test_unstructured_matches_restated_reference(seed, sign_check):
    W, mean, var, sq = _problem(seed)
    mask = wanda_mask(W, sq, 1, 0.5)
    out = dsnot_reference(W, mask, mean, var, sq, cycles=12, threshold=0.05, sign_check=sign_check)
    for i in range(W.shape[0]):
        want, swaps, err = restated_row(
            W[i].tolist(), mask[i].tolist(), mean.tolist(), var.tolist(), sq.tolist(),
            nm=None, score=None, cycles=12, threshold=0.05, power=1.0, sign_check=bool(sign_check),
        )  # fmt: skip
        assert out.mask[i].tolist() == want
        assert int(out.swaps[i]) == swaps
        assert float(out.error_after[i]) == pytest.approx(err, rel=1e-4, abs=1e-4)
    assert int(out.swaps.sum()) > 0
    assert torch.equal(out.mask.sum(1), mask.sum(1))  # each row keeps its count


@pytest.mark.parametrize("seed", [0, 3])
def test_nm_matches_restated_reference_with_the_initial_score(seed):
    W, mean, var, sq = _problem(seed)
    nm = NM(2, 4)
    score = W.abs()  # magnitude as the initial method: its own score chooses what DSnoT prunes in a group
    mask = n_of_m(score, nm)
    out = dsnot_reference(W, mask, mean, var, sq, nm=nm, initial_score=score, cycles=10, threshold=0.05)
    for i in range(W.shape[0]):
        want, swaps, err = restated_row(
            W[i].tolist(), mask[i].tolist(), mean.tolist(), var.tolist(), sq.tolist(),
            nm=nm, score=score[i].tolist(), cycles=10, threshold=0.05, power=1.0, sign_check=True,
        )  # fmt: skip
        assert out.mask[i].tolist() == want
        assert int(out.swaps[i]) == swaps
    assert int(out.swaps.sum()) > 0
    assert torch.equal(out.mask.reshape(6, -1, 4).sum(2), mask.reshape(6, -1, 4).sum(2))  # still 2:4


def test_reference_differs_from_the_secateurs_variant():
    """No sign check: the reference lets a row's error overshoot and change sign; the secateurs variant never does."""
    W, mean, var, sq = _problem(0)
    mask = wanda_mask(W, sq, 1, 0.5)
    ref = dsnot_reference(W, mask, mean, var, sq, cycles=12, threshold=0.05)
    ours = dsnot(W, W.masked_fill(mask, 0), mask, mean, var, sq, cycles=12, threshold=0.05)
    assert not torch.equal(ref.mask, ours.mask)
    assert bool((torch.sign(ref.error_after) != torch.sign(ref.error_before)).any())
    assert bool((ours.error_after.abs() <= ours.error_before.abs()).all())
    assert bool((torch.sign(ours.error_after) * torch.sign(ours.error_before) >= 0).all())


def test_window_variance_is_the_reference_running_average():
    """The reference accumulates torch.var of each window weighted by its tokens; window_var gives the same."""
    g = torch.Generator().manual_seed(0)
    windows = [torch.randn(1, n, 5, generator=g) * (i + 1) + i for i, n in enumerate((7, 3, 11))]
    stats = InputStats()
    for x in windows:
        stats.add(x, {SUM_SQUARES, MEAN, WINDOW_SQUARES})
    stats.finish()
    var, ntokens = None, 0
    for x in windows:
        flat = x.reshape(-1, 5)
        v = flat.var(0, unbiased=False)
        var = v if ntokens == 0 else (var * ntokens + v * flat.shape[0]) / (ntokens + flat.shape[0])
        ntokens += flat.shape[0]
    torch.testing.assert_close(stats.window_var(), var, rtol=1e-5, atol=1e-5)
    _, pooled = stats.mean_var()
    assert bool((pooled > stats.window_var() + 1e-3).all())  # the windows' means differ: pooling adds their spread


def test_reference_variant_defaults():
    ref = DSnoT(variant="reference")
    assert ref.applies("model.layers.0.self_attn.q_proj") and ref.applies("transformer.h.0.attn.c_attn")
    assert not ref.applies("model.layers.0.mlp.down_proj") and not ref.applies("transformer.h.0.mlp.c_fc")
    assert DSnoT(variant="reference", targets=("*.mlp.*",)).applies("model.layers.0.mlp.up_proj")
    assert DSnoT().applies("model.layers.0.mlp.down_proj")
    with pytest.raises(Exception, match="sign"):
        DSnoT(sign_check="off")
    with pytest.raises(Exception, match="variant"):
        DSnoT(variant="paper")


def test_sparsegpt_score_is_the_brute_force_one():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    W = torch.randn(3, 6, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / 4
    Hd = H + 0.01 * H.diag().mean() * torch.eye(6, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    want = W**2 / U.diag() ** 2
    got = sparsegpt_scores(W.float(), (X.T @ X).float(), 4, 0.01)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def _stats(X: torch.Tensor, wanted) -> InputStats:
    s = InputStats()
    for window in X:
        s.add(window.unsqueeze(0), wanted)
    return s.finish()


def test_sparsegpt_then_dsnot_solves_the_kept_weights_again():
    """The double counting fixed: after SparseGPT the regrown weights do not return at their dense values beside
    kept weights that already compensate for them; the kept weights are solved again for the refined mask."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 32, 48, generator=g) + 0.3 * torch.randn(48, generator=g)
    W = torch.randn(16, 48, generator=g)
    stats = _stats(X, {SUM_SQUARES, MEAN, WINDOW_SQUARES, GRAM})
    target = Target(0.6)
    pruner = SparseGPT(blocksize=16)
    weight, mask, info = run_stages("l", W, LinearStages(pruner, DSnoT(threshold=0.0)), stats, target)
    assert info["dsnot"]["swaps"] > 0 and info["dsnot"]["resolved_by"] == "sparsegpt"
    solved, _, _ = sparsegpt_prune(W, stats.H_sum, stats.nsamples, blocksize=16, fixed_mask=mask)
    torch.testing.assert_close(weight, solved.masked_fill(mask, 0))
    plain, plain_mask, _ = run_stages("l", W, LinearStages(pruner, DSnoT(threshold=0.0, resolve=False)), stats, target)
    assert torch.equal(plain_mask, mask)

    def error(Wp):
        Xf = X.reshape(-1, 48)
        return float(((Xf @ (Wp - W).T) ** 2).sum())

    assert error(weight) < error(plain)
    # a pruner without a reconstruction of its own keeps the dense values of the regrown weights
    _, _, info = run_stages("l", W, LinearStages(Wanda(), DSnoT(threshold=0.0)), stats, target)
    assert "resolved_by" not in info["dsnot"]
    assert SparseGPTUpdate(blocksize=16).update(W, W, mask, stats, target).weight.shape == W.shape


def test_reference_variant_in_the_engine_refines_attention_only():
    from secateurs import Recipe, prune

    model = tiny_model()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = Recipe(method="wanda", sparsity=0.5, refine=DSnoT(variant="reference", threshold=0.0))
    report = prune(
        model, recipe, calibration=torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    )
    touched = {lin["name"] for layer in report.layers for lin in layer["linears"] if "dsnot" in lin.get("info", {})}
    assert touched and all("self_attn" in n for n in touched)
    assert any(
        lin["info"]["dsnot"]["swaps"] > 0
        for layer in report.layers
        for lin in layer["linears"]
        if lin["name"] in touched
    )
    for name, p in model.named_parameters():  # kept weights are the dense ones (no update in the reference)
        if name.endswith("proj.weight"):
            kept = p != 0
            assert torch.equal(p[kept], dense[name][kept])
