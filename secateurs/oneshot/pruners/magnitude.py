"""Magnitude pruning: score |W_ij|, one threshold for the whole matrix (or the N lowest of every N:M group)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateurs.oneshot.select import NM, n_of_m, per_matrix
from secateurs.oneshot.stage import Pruner, StageOutput, Target


def magnitude_mask(W: torch.Tensor, sparsity: float | None = None, nm: NM | None = None) -> torch.Tensor:
    """Boolean mask of the weights to prune (True = zero): lowest |W| over the matrix, or per N:M group."""
    scores = W.detach().abs().float()
    return n_of_m(scores, nm) if nm is not None else per_matrix(scores, sparsity)


@dataclass(frozen=True)
class Magnitude(Pruner):
    name: ClassVar[str] = "magnitude"
    summary: ClassVar[str] = "lowest |W| over the whole matrix (no calibration data)"

    def prune(self, W: torch.Tensor, stats, target: Target) -> StageOutput:
        return StageOutput(W, magnitude_mask(W, target.sparsity, target.nm))

    def score(self, W: torch.Tensor, stats) -> torch.Tensor:
        return W.detach().abs().float()
