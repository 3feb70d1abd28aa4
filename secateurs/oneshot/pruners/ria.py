"""RIA, Relative Importance and Activations (Zhang et al., ICLR 2024, "Plug-and-Play: An Efficient Post-training
Pruning Method for Large Language Models").

Score of weight W_ij of a linear with weight [rows = outputs, cols = inputs]::

    RIA_ij = (|W_ij| / sum_k |W_kj|  +  |W_ij| / sum_k |W_ik|) * ||X_j|| ** a

the first term relative to the other weights of input column j (all the outputs it feeds), the second relative to
the other weights of output row i (all the inputs it reads). ``||X_j|| = sqrt(sq_norm_j / nsamples)`` is the root of
the mean over calibration windows of ||X_j||^2, the statistic Wanda uses, and ``a`` = 0.5 as in the paper. This is
the reference code's ``prune_ria`` (``lib/prune.py``): ``torch.sum(|W|, dim=0)`` (column sums, broadcast along rows)
plus ``torch.sum(|W|, dim=1)`` (row sums), times ``sqrt(scaler_row) ** a``, where ``scaler_row`` is the running mean
over samples of ``||X_j||^2`` kept by ``WrappedGPT.add_batch`` (``lib/layerwrapper.py``).

Comparison group: unstructured, the floor(rows * cols * sparsity) lowest scores of the **whole matrix** (the
reference's default; ``per_row`` compares within each output row instead, its ``--per_outneuron``); N:M, the N lowest
of every M consecutive inputs of each row.

**Channel permutation** (``permute``, N:M only, ignored for unstructured targets): the paper's channel reallocation
followed by linear sum assignment (the reference's ``--reallocation --lsa`` with ``--importance_score sum``). The
input columns are reordered so that the N:M groups of the *permuted* matrix keep more total score:

* reallocation: columns sorted by their total score, cut into M equal bands; the band of rank p gives every group
  its p-th member, odd bands in reverse order (so each group mixes weak and strong columns);
* assignment: for each position p within a group in turn, the p-th columns are redistributed over the groups by an
  optimal assignment (``scipy.optimize.linear_sum_assignment``) of the kept score, the other members held fixed.
  The kept score of group h when it receives column c is exact in closed form: with o the other M-1 scores of a
  row sorted descending and K = M - N kept, it is ``sum(o[:K-1]) + max(c, o[K-1])``.

The mask is returned in the ORIGINAL column order: it is N:M in the permuted order only, i.e. ``mask[:, order]``
has N pruned weights in every M consecutive columns, where ``order`` is the permutation (``info["permutation"]
["order"]``, listed when the linear has at most 2048 inputs; its summary always). Running it with N:M kernels
needs the layer's inputs permuted the same way; the dense model saved by the engine needs nothing.

Differences from the reference code, all deliberate:

* scores are computed in fp32 whatever W's dtype (the reference forms the relative terms in the model's fp16);
* a row or column of all-zero weights scores 0 instead of NaN (0/0);
* exact counts with stable tie-breaking (``select.py``): the reference's unstructured threshold ``score <=
  sorted[int(numel * sparsity)]`` prunes one weight more than the target, and more on ties;
* the permutation never ends below the unpermuted N:M mask's kept score: if reallocation plus assignment ends
  lower, the assignment is rerun from the identity, and the identity is kept if that is still not better (the
  reference keeps whatever the heuristic gives);
* ``permute_blocks`` (the reference's ``--fast``, which picks 4/8/16 blocks by layer name and needs the groups to
  divide evenly) splits the groups into that many nearly equal blocks, for any count;
* the reference's ``--reconstruction`` (SparseGPT updates of the kept weights) is not a setting here: it is the
  ``sparsegpt`` update stage, which can follow any pruner; its other column importance scores are not offered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from secateurs.errors import SecateursError
from secateurs.oneshot.select import NM, check_nm_width, n_of_m, per_matrix, per_row
from secateurs.oneshot.stage import SUM_SQUARES, Pruner, StageOutput, Target, option

LIST_ORDER_UP_TO = 2048  # list the permutation in ``info`` for linears with at most this many inputs


def _relative(A: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """A / total, with 0 where total is 0 (then every A it divides is 0 too)."""
    return A / torch.where(total > 0, total, torch.ones_like(total))


def ria_scores(W: torch.Tensor, sq_norm: torch.Tensor, nsamples: int, a: float = 0.5) -> torch.Tensor:
    """fp32 [rows, cols]: (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * sqrt(sq_norm_j / nsamples) ** a."""
    A = W.detach().float().abs()
    relative = _relative(A, A.sum(dim=0, keepdim=True)) + _relative(A, A.sum(dim=1, keepdim=True))
    activation = torch.sqrt(sq_norm.detach().float().to(A.device) / nsamples) ** a
    return relative * activation.reshape(1, -1)


def kept_score(scores: torch.Tensor, nm: NM) -> float:
    """Total score an N:M mask keeps (the M - N largest of every group), summed in float64."""
    rows, cols = scores.shape
    check_nm_width(cols, nm)
    groups = scores.reshape(rows, cols // nm.m, nm.m)
    return float(groups.topk(nm.m - nm.n, dim=-1).values.double().sum())


def reallocation(scores: torch.Tensor, nm: NM) -> torch.Tensor:
    """The paper's heuristic channel reallocation: a column order (permuted position -> original column)."""
    cols = scores.shape[1]
    check_nm_width(cols, nm)
    groups = cols // nm.m
    ranked = torch.argsort(scores.sum(dim=0), stable=True)  # weakest column first
    order = torch.empty_like(ranked)
    for p in range(nm.m):
        band = ranked[p * groups : (p + 1) * groups]
        order[p :: nm.m] = band.flip(0) if p % 2 else band
    return order


def swap_values(grouped: torch.Tensor, p: int, nm: NM) -> torch.Tensor:
    """value[h, g]: score kept by group h of ``grouped`` [rows, G, M] when its position p holds group g's column p.

    Per row, with ``others`` the group's other M - 1 scores sorted descending and K = M - N kept, the candidate c
    adds ``sum(others[:K-1]) + max(c, others[K-1])``; summed over rows, max(c, t) = (c + t + |c - t|) / 2 turns the
    [rows, G, G] comparison into one L1 distance matrix (float64).
    """
    keep = grouped.shape[2] - nm.n
    grouped = grouped.double()
    candidate = grouped[:, :, p]  # [rows, G]
    others = torch.cat([grouped[:, :, :p], grouped[:, :, p + 1 :]], dim=-1).sort(dim=-1, descending=True).values
    base = others[:, :, : keep - 1].sum(dim=(0, 2))  # [G]: the K-1 best others always stay
    threshold = others[:, :, keep - 1]  # [rows, G]: the K-th best other, which the candidate must beat
    distance = torch.cdist(threshold.t().contiguous(), candidate.t().contiguous(), p=1)  # [h, g]
    both = threshold.sum(dim=0).unsqueeze(1) + candidate.sum(dim=0).unsqueeze(0)
    return base.unsqueeze(1) + 0.5 * (both + distance)


def _assignment_solver():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise SecateursError("ria: permute needs scipy (pip install scipy) for its linear sum assignment") from None
    return linear_sum_assignment


def assignment_rounds(scores: torch.Tensor, order: torch.Tensor, nm: NM, blocks: int = 1) -> torch.Tensor:
    """One round of linear sum assignment per position in the group, starting from ``order``; returns the new order.

    Each step keeps the identity assignment available, so (up to rounding) the kept score never decreases.
    """
    solve = _assignment_solver()
    rows, cols = scores.shape
    G, M = cols // nm.m, nm.m
    order = order.clone()
    bounds = [G * b // blocks for b in range(blocks + 1)]
    for p in range(M):
        grouped = scores[:, order].reshape(rows, G, M)
        new_order = order.clone()
        for g0, g1 in zip(bounds[:-1], bounds[1:], strict=True):
            if g1 - g0 < 2:
                continue
            value = swap_values(grouped[:, g0:g1], p, nm)
            receivers, givers = solve(value.cpu().numpy(), maximize=True)
            receivers = torch.as_tensor(receivers, device=order.device) + g0
            givers = torch.as_tensor(givers, device=order.device) + g0
            new_order[receivers * M + p] = order[givers * M + p]
        order = new_order
    return order


def channel_permutation(scores: torch.Tensor, nm: NM, blocks: int = 1) -> tuple[torch.Tensor, dict]:
    """Column order for N:M (permuted position -> original column) and a summary; never keeps less than identity."""
    rows, cols = scores.shape
    check_nm_width(cols, nm)
    identity = torch.arange(cols, device=scores.device)
    unpermuted = kept_score(scores, nm)
    info = {"start": "none", "kept_score_unpermuted": unpermuted}
    if cols // nm.m < 2:  # one group: reordering its members changes nothing
        order, kept = identity, unpermuted
    else:
        start = reallocation(scores, nm)
        info["kept_score_reallocation"] = kept_score(scores[:, start], nm)
        order = assignment_rounds(scores, start, nm, blocks)
        kept, info["start"] = kept_score(scores[:, order], nm), "reallocation"
        if kept < unpermuted:
            order = assignment_rounds(scores, identity, nm, blocks)
            kept, info["start"] = kept_score(scores[:, order], nm), "identity"
            if kept < unpermuted:
                order, kept, info["start"] = identity, unpermuted, "none"
    info["kept_score"] = kept
    info["columns_moved"] = int((order != identity).sum())
    if cols <= LIST_ORDER_UP_TO:
        info["order"] = order.tolist()
    return order, info


def ria_mask(
    scores: torch.Tensor,
    sparsity: float,
    nm: NM | None = None,
    row_wise: bool = False,
    permute: bool = False,
    blocks: int = 1,
) -> tuple[torch.Tensor, dict]:
    """Mask (True = pruned) from RIA scores, and details: the permutation's summary when one was searched."""
    if nm is None:
        return (per_row(scores, sparsity) if row_wise else per_matrix(scores, sparsity)), {}
    if not permute:
        return n_of_m(scores, nm), {}
    order, info = channel_permutation(scores, nm, blocks)
    mask = torch.empty_like(scores, dtype=torch.bool)
    mask[:, order] = n_of_m(scores[:, order], nm)
    return mask, {"permutation": info}


@dataclass(frozen=True)
class RIA(Pruner):
    name: ClassVar[str] = "ria"
    summary: ClassVar[str] = "lowest (|W|/row sum + |W|/column sum) * ||x||^a over the whole matrix (RIA)"
    needs: ClassVar[frozenset[str]] = frozenset({SUM_SQUARES})

    a: float = option(0.5, "exponent of the input norm ||x_j|| in the score (the paper's 0.5)")
    per_row: bool = option(False, "unstructured: compare within each output row (Wanda's group), not the whole matrix")
    permute: bool = option(False, "N:M: permute input channels to keep more score (mask is N:M in that order only)")
    permute_blocks: int = option(1, "N:M with permute: assign channels within this many blocks of groups (faster)")

    def __post_init__(self) -> None:
        self.check(math.isfinite(self.a) and self.a >= 0, f"a must be a non-negative number, got {self.a}")
        self.check(self.permute_blocks >= 1, f"permute_blocks must be positive, got {self.permute_blocks}")
        if self.permute:
            _assignment_solver()

    def prune(self, W: torch.Tensor, stats, target: Target) -> StageOutput:
        self.check(
            stats is not None and stats.sq_norm is not None and stats.nsamples > 0,
            "needs calibration statistics (sq_norm, nsamples)",
        )
        scores = ria_scores(W, stats.sq_norm, stats.nsamples, self.a)
        mask, info = ria_mask(scores, target.sparsity, target.nm, self.per_row, self.permute, self.permute_blocks)
        return StageOutput(W, mask, info)

    def score(self, W: torch.Tensor, stats) -> torch.Tensor:
        return ria_scores(W, stats.sq_norm, stats.nsamples, self.a)
