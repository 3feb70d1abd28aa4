"""Magnitude pruning: score |W_ij|, one threshold for the whole matrix (or N:M groups)."""

from __future__ import annotations

import torch

from secateurs.patterns import NM, n_of_m, per_matrix


def magnitude_mask(W: torch.Tensor, sparsity: float | None = None, nm: NM | None = None) -> torch.Tensor:
    """Boolean mask of the weights to prune (True = zero): lowest |W| over the matrix, or per N:M group."""
    scores = W.detach().abs().float()
    return n_of_m(scores, nm) if nm is not None else per_matrix(scores, sparsity)
