"""Which weights to prune, given a score per weight (lower score = pruned first).

Every selector returns a boolean ``pruned`` mask of the score's shape (True = set to zero). Ties are
broken by position, so the counts are exact and the result is deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from secateurs.errors import SecateursError


@dataclass(frozen=True)
class NM:
    """N:M sparsity: in every group of ``m`` consecutive input columns of a row, ``n`` weights are zero."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (1 <= self.n < self.m):
            raise SecateursError(f"invalid N:M pattern {self.n}:{self.m}: need 1 <= N < M (N zeros in every M)")

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_nm(text: str) -> NM:
    """Parse ``"2:4"`` (2 zeros in every 4 consecutive weights) into an :class:`NM`."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match:
        raise SecateursError(f"malformed N:M pattern {text!r}: expected two integers like '2:4' (N zeros in every M)")
    return NM(int(match.group(1)), int(match.group(2)))


def check_sparsity(sparsity: float) -> float:
    """Validate an unstructured sparsity target (fraction of weights set to zero)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise SecateursError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= value < 1.0):
        raise SecateursError(f"sparsity must be in [0, 1), got {value}")
    return value


# rows sorted at once by the row-wise selectors: bounds the sort's int64 indices (8 bytes per score) to 32 MB
ROWS_BLOCK_SCORES = 1 << 22


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest entries along the last dimension (stable: earlier position wins a tie)."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)  # contiguous, whatever scores' strides
    if k <= 0:
        return mask
    if scores.dim() == 1:
        return mask.scatter_(-1, torch.argsort(scores, stable=True)[:k], True)
    rows = scores.reshape(-1, scores.shape[-1])
    out = mask.view(-1, scores.shape[-1])
    step = max(1, ROWS_BLOCK_SCORES // scores.shape[-1])
    for start in range(0, rows.shape[0], step):  # rows are independent: blocks give the same mask, in less memory
        order = torch.argsort(rows[start : start + step], dim=-1, stable=True)
        out[start : start + step].scatter_(-1, order[:, :k], True)
    return mask


def per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the floor(cols * sparsity) lowest scores of every row (Wanda's comparison group)."""
    return _lowest(scores, int(scores.shape[-1] * sparsity))


def per_matrix(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the floor(numel * sparsity) lowest scores of the whole matrix: one threshold (magnitude)."""
    return _lowest(scores.reshape(-1), int(scores.numel() * sparsity)).reshape(scores.shape)


def check_nm_width(cols: int, nm: NM) -> None:
    if cols % nm.m:
        raise SecateursError(f"N:M pattern {nm} needs an input width divisible by {nm.m}, got {cols}")


def n_of_m(scores: torch.Tensor, nm: NM) -> torch.Tensor:
    """In every row, in each group of M consecutive columns, prune the N lowest scores."""
    rows, cols = scores.shape
    check_nm_width(cols, nm)
    return _lowest(scores.reshape(rows, cols // nm.m, nm.m), nm.n).reshape(rows, cols)


def nm_per_layer(sparsities: Sequence[float], m: int) -> list[NM]:
    """N:M per layer: layer l zeroes about M * sparsity_l of every M, within [1, M-1].

    Largest-remainder rounding keeps sum(N_l) = round(M * sum(sparsity_l)), so the mean sparsity stays the
    target whenever the clamping to [1, M-1] does not bind.
    """
    wanted = [m * s for s in sparsities]
    n = [int(x) for x in wanted]
    spare = round(sum(wanted)) - sum(n)
    for i in sorted(range(len(n)), key=lambda i: wanted[i] - n[i], reverse=True)[: max(spare, 0)]:
        n[i] += 1
    return [NM(min(max(k, 1), m - 1), m) for k in n]
