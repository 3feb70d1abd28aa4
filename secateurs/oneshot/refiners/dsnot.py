"""DSnoT (Zhang et al., 2024): training-free prune-and-grow that lowers each row's reconstruction error.

Start from any pruning mask. For output row i the *reconstruction error proxy* is the expected change of the
row's output caused by pruning::

    e_i = L * sum_j (W0_ij - W_ij) * mean(x_j)

where W0 is the dense weight, W the current (pruned, possibly updated) weight, mean(x_j) the mean of input
feature j over the calibration tokens and L the number of tokens per calibration window (the reference code
accumulates per-window sums, so its default threshold of 0.1 is in these units).

Each cycle makes one swap per row, which keeps the row's number of pruned weights (and every N:M group's count)
exactly as it was:

* **regrow** the pruned weight whose regrowth moves e_i towards zero the most, ranked by
  ``W0_ij * mean(x_j) / var(x_j) ** power`` (large contribution, low input variance first), with the sign of e_i;
* **prune** a kept weight instead: unstructured, the kept weight with the lowest Wanda score
  ``|W_ij| * ||x_j||`` whose contribution ``W_ij * mean(x_j)`` has the sign opposite to e_i; N:M, the kept weight
  with the lowest Wanda score in the regrown weight's group (weights regrown by DSnoT are never pruned again).

A row stops at the first swap that would flip the sign of its error or fail to shrink it (the sign check; the
reference code's flag for it never turns it on), when |e_i| <= threshold, when no candidate is left, or after
``cycles`` swaps. So |e_i| never increases. Every weight changes state at most once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateurs.oneshot.select import NM
from secateurs.oneshot.stage import MEAN, SUM_SQUARES, WINDOW_SQUARES, Refiner, StageOutput, Target, option


@dataclass
class DSnoTResult:
    mask: torch.Tensor  # bool [rows, cols], True = pruned
    swaps: torch.Tensor  # int64 [rows]: swaps made in each row
    error_before: torch.Tensor  # float [rows]: e_i of the initial mask
    error_after: torch.Tensor  # float [rows]: e_i of the refined mask

    def summary(self) -> dict:
        return {
            "swaps": int(self.swaps.sum()),
            "rows_changed": int((self.swaps > 0).sum()),
            "mean_abs_error_before": float(self.error_before.abs().mean()),
            "mean_abs_error_after": float(self.error_after.abs().mean()),
        }


def _ends(order: torch.Tensor, from_end: torch.Tensor) -> torch.Tensor:
    """Initial pointer per row: 0 (walk forwards) or the last column (walk backwards)."""
    return torch.where(from_end, order.shape[1] - 1, 0)


@torch.no_grad()
def dsnot(
    W_dense: torch.Tensor,
    W: torch.Tensor,
    pruned: torch.Tensor,
    x_mean: torch.Tensor,
    x_var: torch.Tensor,
    x_sq_norm: torch.Tensor,
    *,
    nm: NM | None = None,
    cycles: int = 50,
    threshold: float = 0.1,
    power: float = 1.0,
    scale: float = 1.0,
) -> DSnoTResult:
    """Refine the pruning mask ``pruned`` (bool [rows, cols], True = pruned) of one linear.

    ``W_dense`` holds the weights before pruning; ``W`` the weights after it (zeros where pruned; the kept ones may
    have been updated, e.g. by SparseGPT). ``x_mean``, ``x_var`` and ``x_sq_norm`` are per input feature: mean,
    variance and sum of squares over the calibration tokens. ``scale`` multiplies the error (tokens per window).
    Regrown weights take their dense value: ``torch.where(result.mask, 0, torch.where(pruned, W_dense, W))``.
    """
    rows, cols = W.shape
    W0 = W_dense.float()
    Wc = W.float()
    mean = x_mean.float().reshape(1, -1) * scale
    var = x_var.float().clamp_min(torch.finfo(torch.float32).tiny).reshape(1, -1)
    mask = pruned.clone()
    kept0 = ~pruned
    dev = W.device
    row_ids = torch.arange(rows, device=dev)

    error = ((W0 - Wc) * mean).sum(1)  # e_i
    gain = torch.where(pruned, W0 * mean, 0.0)  # regrowing j lowers e_i by gain_ij
    cost = torch.where(kept0, Wc * mean, 0.0)  # pruning k raises e_i by cost_ik
    rank = gain / var**power if power else gain.clone()
    wanda = Wc.abs() * x_sq_norm.float().sqrt().reshape(1, -1)

    # regrowth candidates: ascending rank; rows with e > 0 walk from the end (largest positive first)
    regrow_order = torch.sort(rank, dim=1, stable=True).indices
    positive = error > 0
    r_ptr = _ends(regrow_order, positive)
    r_step = torch.where(positive, -1, 1)

    if nm is None:
        # pruning candidates: kept weights with negative cost first (lowest Wanda score first), then the rest, then
        # kept weights with positive cost (lowest Wanda score last, so rows with e < 0 walk from the end)
        group = torch.where(kept0 & (cost < 0), 0, torch.where(kept0 & (cost > 0), 2, 1))
        key = torch.where(group == 2, -wanda, wanda)
        order = torch.sort(key, dim=1, stable=True).indices
        prune_order = order.gather(1, torch.sort(group.gather(1, order), dim=1, stable=True).indices)
        p_ptr = _ends(prune_order, ~positive)
        p_step = torch.where(positive, 1, -1)
    else:
        eligible = kept0.clone()  # kept now, and never regrown

    sign0 = torch.sign(error)
    active = error.abs() > threshold
    swaps = torch.zeros(rows, dtype=torch.long, device=dev)
    error_before = error.clone()
    for _ in range(cycles):
        if not bool(active.any()):
            break
        r_ok = (r_ptr >= 0) & (r_ptr < cols)
        j = regrow_order[row_ids, r_ptr.clamp(0, cols - 1)]
        g = gain[row_ids, j]
        r_ok &= mask[row_ids, j] & torch.where(positive, g > 0, g < 0)
        if nm is None:
            p_ok = (p_ptr >= 0) & (p_ptr < cols)
            k = prune_order[row_ids, p_ptr.clamp(0, cols - 1)]
            c = cost[row_ids, k]
            p_ok &= ~mask[row_ids, k] & torch.where(positive, c < 0, c > 0)
        else:
            start = j - j % nm.m
            members = start.reshape(-1, 1) + torch.arange(nm.m, device=dev).reshape(1, -1)
            scores = torch.where(eligible.gather(1, members), wanda.gather(1, members), float("inf"))
            best = scores.min(1)
            k = members.gather(1, best.indices.reshape(-1, 1)).squeeze(1)
            p_ok = torch.isfinite(best.values)
            c = cost[row_ids, k]
        after = error - g + c
        ok = active & r_ok & p_ok & (torch.sign(after) == sign0) & (after.abs() < error.abs())
        rows_ok = row_ids[ok]
        mask[rows_ok, j[ok]] = False
        mask[rows_ok, k[ok]] = True
        if nm is not None:
            eligible[rows_ok, k[ok]] = False
        error = torch.where(ok, after, error)
        swaps += ok.long()
        r_ptr = r_ptr + r_step
        if nm is None:
            p_ptr = p_ptr + p_step
        active = ok & (error.abs() > threshold)
    return DSnoTResult(mask, swaps, error_before, error)


def _attention(name: str) -> bool:
    """A linear of the attention block (a path component names it: self_attn, attn, attention ...)."""
    return any("attn" in part or "attention" in part for part in name.lower().split("."))


@torch.no_grad()
def dsnot_reference(
    W_dense: torch.Tensor,
    pruned: torch.Tensor,
    x_mean: torch.Tensor,
    x_var: torch.Tensor,
    x_sq_norm: torch.Tensor,
    *,
    nm: NM | None = None,
    initial_score: torch.Tensor | None = None,
    cycles: int = 50,
    threshold: float = 0.1,
    power: float = 1.0,
    scale: float = 1.0,
    sign_check: bool | None = None,
) -> DSnoTResult:
    """DSnoT as ``prune_DSnoT`` of the reference code (github.com/zyxxmu/DSnoT, ``lib/prune.py``) runs it.

    Every quantity is of the dense weight W0: the contribution of weight j to row i's error is
    ``m_ij = W0_ij * mean(x_j) * scale`` and the error is the sum of the pruned ones' contributions.

    * **regrowth**: all columns sorted by ``m_ij / var_j ** power`` with kept weights at 0; two pointers per row, one
      from each end. A row with e > 0 takes the next candidate from the end, otherwise from the start; only the
      pointer used moves, one step per cycle.
    * **pruning**, unstructured: the kept weights sorted by the Wanda score ``|W0_ij| ||x_j||``, reordered so that
      those with m < 0 come first (lowest Wanda score first) and those with m > 0 last (lowest Wanda score last); two
      pointers again, a row with e < 0 taking from the end. N:M: the kept weight of the regrown weight's group with
      the lowest ``initial_score`` (the initial method's own score; weights pruned by DSnoT are never chosen again).
    * a swap is made while ``|e| > threshold`` (and, with the sign check, while it keeps e's initial sign); a row
      that fails once stops for good; at most ``cycles`` cycles. The pointers move every cycle, as in the reference.
    * ``sign_check`` None: as the reference code, off for unstructured masks (its ``--without_same_sign`` is a
      ``type=bool`` flag that no command-line value turns off) and on for N:M.

    The one departure: where the reference's pointer would run past the candidates (onto a weight that is not
    pruned, or a kept weight list exhausted) and swap a weight in the wrong state, the row stops instead; with 50
    cycles and hundreds of candidates per row this does not arise on real layers.
    """
    rows, cols = W_dense.shape
    dev = W_dense.device
    W0 = W_dense.float()
    metric = W0 * (x_mean.float().reshape(1, -1) * scale)
    var = x_var.float().clamp_min(torch.finfo(torch.float32).tiny).reshape(1, -1)
    mask = pruned.clone()
    row_ids = torch.arange(rows, device=dev)
    check = (nm is not None) if sign_check is None else sign_check

    error = torch.where(pruned, metric, 0.0).sum(1)
    sign0 = torch.sign(error)
    regrow = torch.where(pruned, metric, 0.0)
    if power:
        regrow = regrow / var**power
    regrow_order = torch.sort(regrow, dim=1, stable=True).indices
    r_ptr = torch.stack([torch.zeros(rows, dtype=torch.long, device=dev), torch.full((rows,), cols - 1, device=dev)], 1)
    steps = torch.tensor([1, -1], device=dev)

    if nm is None:
        wanda = W0.abs() * x_sq_norm.float().sqrt().reshape(1, -1)
        kept = ~pruned
        # kept with m < 0 (Wanda ascending), kept with m == 0, kept with m > 0 (Wanda descending), then the pruned
        group = torch.where(~kept, 3, torch.where(metric < 0, 0, torch.where(metric > 0, 2, 1)))
        key = torch.where(group == 2, -wanda, wanda)
        order = torch.sort(key, dim=1, stable=True).indices
        prune_order = order.gather(1, torch.sort(group.gather(1, order), dim=1, stable=True).indices)
        last = kept.sum(1) - 1
        p_ptr = torch.stack([torch.zeros(rows, dtype=torch.long, device=dev), last], 1)
    else:
        if initial_score is None:
            initial_score = W0.abs() * x_sq_norm.float().sqrt().reshape(1, -1)
        score = torch.where(pruned, float("inf"), initial_score.float())

    update = torch.ones(rows, dtype=torch.bool, device=dev)
    swaps = torch.zeros(rows, dtype=torch.long, device=dev)
    error_before = error.clone()
    for _ in range(cycles):
        if not bool(update.any()):
            break
        side = (error > 0).long()
        at = r_ptr.gather(1, side.reshape(-1, 1)).squeeze(1)
        ok = (at >= 0) & (at < cols)
        j = regrow_order[row_ids, at.clamp(0, cols - 1)]
        ok &= mask[row_ids, j]
        r_ptr[row_ids, side] += steps[side]
        if nm is None:
            p_side = (error < 0).long()
            p_at = p_ptr.gather(1, p_side.reshape(-1, 1)).squeeze(1)
            ok &= (p_at >= 0) & (p_at <= last)
            k = prune_order[row_ids, p_at.clamp(0, cols - 1)]
            ok &= ~mask[row_ids, k]
            p_ptr[row_ids, p_side] += steps[p_side]
        else:
            start = j - j % nm.m
            members = start.reshape(-1, 1) + torch.arange(nm.m, device=dev).reshape(1, -1)
            best = score.gather(1, members).min(1)
            k = members.gather(1, best.indices.reshape(-1, 1)).squeeze(1)
            ok &= torch.isfinite(best.values)
            score[row_ids, k] = float("inf")
        after = error + metric[row_ids, k] - metric[row_ids, j]
        update &= ok & (error.abs() > threshold)
        if check:
            update &= torch.sign(after) == sign0
        rows_ok = row_ids[update]
        mask[rows_ok, k[update]] = True
        mask[rows_ok, j[update]] = False
        error = torch.where(update, after, error)
        swaps += update.long()
    return DSnoTResult(mask, swaps, error_before, error)


def refined_weight(W_dense: torch.Tensor, W: torch.Tensor, pruned: torch.Tensor, result: DSnoTResult) -> torch.Tensor:
    """The weight after refinement: regrown weights take their dense value, newly pruned ones become zero."""
    return torch.where(result.mask, torch.zeros_like(W), torch.where(pruned, W_dense, W))


VARIANTS = ("secateurs", "reference")
SIGN_CHECKS = ("auto", "on", "off")
VARIANCES = ("auto", "tokens", "windows")


@dataclass(frozen=True)
class DSnoT(Refiner):
    name: ClassVar[str] = "dsnot"
    summary: ClassVar[str] = "training-free prune-and-grow that brings each row's expected output error towards zero"
    needs: ClassVar[frozenset[str]] = frozenset({SUM_SQUARES, MEAN, WINDOW_SQUARES})
    flag_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"targets": ("--dsnot-target",)}

    cycles: int = option(50, "at most this many prune-and-grow swaps per row")
    threshold: float = option(0.1, "a row stops once |error| <= this")
    power: float = option(1.0, "regrowth ranks by contribution / var ** power")
    variant: str = option(
        "secateurs",
        "secateurs (every pruned linear; a swap only if it shrinks |error| and keeps its sign; Wanda ranks what to "
        "prune) or reference (as github.com/zyxxmu/DSnoT runs it: attention linears only, no sign check unless N:M, "
        "per-window variances, the initial method's score under N:M, dense kept weights)",
    )
    sign_check: str = option("auto", "auto (the variant's), on or off: a swap may not flip the sign of the error")
    variance: str = option("auto", "auto (the variant's), tokens (over all tokens) or windows (mean per-window)")
    resolve: bool = option(
        True,
        "secateurs variant after a pruner that updates the kept weights (SparseGPT, ADMM-gradual): solve the kept "
        "weights again for the refined mask with that pruner's own update",
    )

    def __post_init__(self) -> None:
        self.check(
            self.cycles >= 0 and self.threshold >= 0 and self.power >= 0,
            "cycles, threshold and power must be non-negative",
        )
        self.check(self.variant in VARIANTS, f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        self.check(self.sign_check in SIGN_CHECKS, f"sign_check must be one of {', '.join(SIGN_CHECKS)}")
        self.check(self.variance in VARIANCES, f"variance must be one of {', '.join(VARIANCES)}")
        self.check(
            not (self.variant == "secateurs" and self.sign_check == "off"),
            "the secateurs variant always keeps the error's sign (sign_check off needs variant reference)",
        )

    def applies(self, name: str) -> bool:
        if not self.targets and self.variant == "reference":
            return _attention(name)  # the reference's --skip_layer mlp
        return super().applies(name)

    def refine(self, W_dense, W, mask, stats, target: Target, pruner=None) -> StageOutput:
        mean, var = stats.mean_var()
        windows = self.variance == "windows" or (self.variance == "auto" and self.variant == "reference")
        if windows and stats.window_sq is not None:
            var = stats.window_var()
        scale = stats.ntokens / stats.nsamples
        settings = dict(nm=target.nm, cycles=self.cycles, threshold=self.threshold, power=self.power, scale=scale)
        if self.variant == "reference":
            score = pruner.score(W_dense, stats) if pruner is not None and target.nm is not None else None
            check = None if self.sign_check == "auto" else self.sign_check == "on"
            result = dsnot_reference(
                W_dense, mask, mean, var, stats.sq_norm, initial_score=score, sign_check=check, **settings
            )
            weight = torch.where(result.mask, torch.zeros_like(W_dense), W_dense)
            return StageOutput(weight.to(W.dtype), result.mask, result.summary())
        result = dsnot(W_dense, W, mask, mean, var, stats.sq_norm, **settings)
        info = result.summary()
        if self.resolve and pruner is not None and bool(result.swaps.any()):
            solved = pruner.reconstruct(W_dense, W, result.mask, stats, target)
            if solved is not None:
                info["resolved_by"] = pruner.name
                return StageOutput(solved.weight.to(W.dtype), result.mask, info)
        return StageOutput(refined_weight(W_dense, W, mask, result).to(W.dtype), result.mask, info)
