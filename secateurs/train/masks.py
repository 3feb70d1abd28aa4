"""The mask arithmetic of sparse training, as pure functions on tensors (``keep``: True = the weight is active).

A layer's mask is over *units*: single weights (``granularity="weight"``) or whole kernels, one per
(output channel, input channel) pair of a convolution (``granularity="kernel"``, E2ENet's DSFF). A unit mask
broadcasts against the weight. Every selection here is exact in its counts and breaks ties by position, so a
run is deterministic and the tests can compare with a brute-force choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from secateurs.errors import SecateursError
from secateurs.oneshot.select import NM

GRANULARITIES = ("weight", "kernel")


def unit_shape(shape: Sequence[int], granularity: str) -> tuple[int, ...]:
    """The mask's shape for a weight of ``shape``: the weight's own, or [out, in, 1, ...] for kernels."""
    if granularity == "weight" or len(shape) <= 2:
        return tuple(shape)
    if granularity == "kernel":
        return (shape[0], shape[1]) + (1,) * (len(shape) - 2)
    raise SecateursError(f"unknown granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")


def unit_scores(t: torch.Tensor, granularity: str) -> torch.Tensor:
    """|t| per unit, in float32: the magnitude of each weight, or each kernel's L1 norm (sum of |w| over it)."""
    a = t.detach().abs().float()
    if granularity == "kernel" and a.dim() > 2:
        return a.sum(dim=tuple(range(2, a.dim())), keepdim=True)
    return a


def _select(flat: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Bool mask of the ``k`` largest (or smallest) entries of the 1-D ``flat``, a tie going to the earlier position:
    exactly the first ``k`` of a stable sort, found with one ``topk`` for the threshold (a full sort of a large layer
    at every update costs tens of times a training step)."""
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    values = torch.topk(flat, k, largest=largest, sorted=False).values
    threshold = values.min() if largest else values.max()
    strictly = flat > threshold if largest else flat < threshold
    ties = flat == threshold
    need = k - int(strictly.sum())
    return strictly | (ties & (torch.cumsum(ties, 0) <= need))


def _highest(scores: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the k highest scores (among ``allowed``); a tie goes to the earlier position."""
    flat = scores.reshape(-1).float()
    if allowed is not None:
        flat = torch.where(allowed.reshape(-1), flat, torch.tensor(-math.inf, device=flat.device))
    return _select(flat, k, largest=True).reshape(scores.shape)


def _lowest(scores: torch.Tensor, k: int, allowed: torch.Tensor) -> torch.Tensor:
    """Bool mask of the k lowest scores among ``allowed``; a tie goes to the earlier position."""
    flat = torch.where(allowed.reshape(-1), scores.reshape(-1).float(), torch.tensor(math.inf, device=scores.device))
    return _select(flat, k, largest=False).reshape(scores.shape)


def kept_count(units: int, density: float) -> int:
    """How many of ``units`` a layer of ``density`` keeps (rounded; at least one when the density is positive)."""
    if density <= 0:
        return 0
    return min(units, max(1, round(density * units)))


def top_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of units with the highest scores (magnitude initialisation, GMP)."""
    return _highest(scores, kept_count(scores.numel(), density))


def random_mask(shape: Sequence[int], density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep exactly round(density * units) units chosen uniformly at random (on the CPU generator)."""
    return top_mask(torch.rand(tuple(shape), generator=generator), density)


def drop_and_grow(
    keep: torch.Tensor, drop_scores: torch.Tensor, grow_scores: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SET/RigL update of a layer: deactivate the ``count`` active units with the lowest ``drop_scores``, then
    activate the ``count`` units with the highest ``grow_scores`` among those now inactive (the just-dropped
    included, as in the RigL reference). Returns (new keep, dropped, grown); the active count is unchanged.

    A unit both dropped and grown is in neither set: it stays active and keeps its value.
    """
    count = min(int(count), int(keep.sum()), int((~keep).sum()) + int(count))
    if count <= 0:
        none = torch.zeros_like(keep)
        return keep.clone(), none, none.clone()
    dropped = _lowest(drop_scores, count, keep)
    after_drop = keep & ~dropped
    grown = _highest(grow_scores, count, ~after_drop)
    new = after_drop | grown
    return new, dropped & ~grown, grown & ~dropped


def nm_keep(t: torch.Tensor, nm: NM) -> torch.Tensor:
    """The N:M mask of |t| (True = kept): in every group of M consecutive input channels, the N smallest are off.

    For a Linear weight [out, in] the groups run along ``in``; for a convolution [out, in, *k] along ``in`` at
    each (out, kernel position), as in the SR-STE reference (the weight permuted to [out, *k, in]).
    """
    a = t.detach().abs().float()
    if a.dim() < 2 or a.shape[1] % nm.m:
        raise SecateursError(
            f"N:M pattern {nm} needs an input width divisible by {nm.m}, got {a.shape[1] if a.dim() > 1 else a.shape}"
        )
    moved = a.movedim(1, -1)  # [out, *k, in]
    groups = moved.reshape(-1, nm.m)
    order = torch.argsort(groups, dim=1, stable=True)
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(1, order[:, : nm.n], False)
    return keep.reshape(moved.shape).movedim(-1, 1)


def random_nm_keep(shape: Sequence[int], nm: NM, generator: torch.Generator) -> torch.Tensor:
    """A random N:M mask of ``shape`` (the same grouping as :func:`nm_keep`)."""
    return nm_keep(torch.rand(tuple(shape), generator=generator), nm)


def erk_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    *,
    power: float = 1.0,
    dense: Sequence[str] = (),
) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities (Evci et al. 2020): density_l proportional to (sum of dims / product of dims)^power
    (n_in + n_out + k_h + k_w over their product for a convolution), scaled so the parameter-weighted mean density is
    ``density``. A layer that would exceed 1 is made dense and the rest rescaled, until none does.
    ``dense`` names layers kept dense from the start (their weights count toward the mean).
    """
    if not 0 < density <= 1:
        raise SecateursError(f"density must be in (0, 1], got {density}")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: (sum(shape) / math.prod(shape)) ** power for name, shape in shapes.items()}
    total = sum(sizes.values())
    dense_set = set(dense)
    eps = 0.0
    while True:
        budget = density * total - sum(sizes[n] for n in dense_set)
        free = sum(raw[n] * sizes[n] for n in shapes if n not in dense_set)
        if free <= 0:
            break
        eps = budget / free
        over = [n for n in shapes if n not in dense_set and eps * raw[n] > 1]
        if not over:
            break
        dense_set.add(max(over, key=lambda n: raw[n]))
    return {name: 1.0 if name in dense_set else max(0.0, min(1.0, eps * raw[name])) for name in shapes}


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """The same density for every layer."""
    return dict.fromkeys(shapes, float(density))
