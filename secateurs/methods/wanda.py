"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||, compared within each output row.

``sq_norm`` is the sum over all calibration tokens of x_j^2 for each input feature j and ``nsamples`` the
number of calibration sequences, so ``sq_norm / nsamples`` is the mean over samples of ||X_j||^2.
"""

from __future__ import annotations

import torch

from secateurs.patterns import NM, n_of_m, per_row


def wanda_scores(W: torch.Tensor, sq_norm: torch.Tensor, nsamples: int) -> torch.Tensor:
    """score_ij = |W_ij| * sqrt(mean over samples of ||X_j||^2)."""
    return W.detach().abs().float() * torch.sqrt(sq_norm.float() / nsamples).reshape(1, -1)


def wanda_mask(
    W: torch.Tensor, sq_norm: torch.Tensor, nsamples: int, sparsity: float | None = None, nm: NM | None = None
) -> torch.Tensor:
    """Boolean mask of the weights to prune: each row loses floor(cols * sparsity), or N per M-group."""
    scores = wanda_scores(W, sq_norm, nsamples)
    return n_of_m(scores, nm) if nm is not None else per_row(scores, sparsity)
