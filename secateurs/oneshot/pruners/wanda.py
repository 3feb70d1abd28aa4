"""Wanda (Sun et al., 2024): score |W_ij| * ||X_j||, compared within each output row.

``sq_norm`` is the sum over calibration tokens of x_j^2 for input feature j and ``nsamples`` the number of
calibration sequences, so ``sq_norm / nsamples`` is the mean over samples of ||X_j||^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateurs.oneshot.select import NM, n_of_m, per_row
from secateurs.oneshot.stage import SUM_SQUARES, Pruner, StageOutput, Target


def wanda_scores(W: torch.Tensor, sq_norm: torch.Tensor, nsamples: int) -> torch.Tensor:
    """score_ij = |W_ij| * sqrt(mean over samples of ||X_j||^2)."""
    return W.detach().abs().float() * torch.sqrt(sq_norm.float() / nsamples).reshape(1, -1)


def wanda_mask(
    W: torch.Tensor, sq_norm: torch.Tensor, nsamples: int, sparsity: float | None = None, nm: NM | None = None
) -> torch.Tensor:
    """Boolean mask of the weights to prune: each row loses floor(cols * sparsity), or N per M-group."""
    scores = wanda_scores(W, sq_norm, nsamples)
    return n_of_m(scores, nm) if nm is not None else per_row(scores, sparsity)


@dataclass(frozen=True)
class Wanda(Pruner):
    name: ClassVar[str] = "wanda"
    summary: ClassVar[str] = "lowest |W| * ||x|| in each output row"
    needs: ClassVar[frozenset[str]] = frozenset({SUM_SQUARES})

    def prune(self, W: torch.Tensor, stats, target: Target) -> StageOutput:
        return StageOutput(W, wanda_mask(W, stats.sq_norm, stats.nsamples, target.sparsity, target.nm))

    def score(self, W: torch.Tensor, stats) -> torch.Tensor:
        return wanda_scores(W, stats.sq_norm, stats.nsamples)
