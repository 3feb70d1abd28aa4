"""What a sparse-training method is: a typed config (a frozen dataclass, like every one-shot stage) with pure
functions for its initial mask, its schedule and its mask update. :class:`secateurs.train.sparse.SparseTraining`
drives any of them; adding a method is adding a file under ``methods/`` and one entry in ``registry.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateurs.oneshot.select import NM
from secateurs.oneshot.stage import Stage
from secateurs.train import masks as M


@dataclass
class Layer:
    """What a method sees of one sparse layer at an update: its weight, its mask and what it is aiming for."""

    name: str
    weight: torch.Tensor  # the parameter's data (updated in place by the engine, never by a method)
    keep: torch.Tensor  # bool, unit shape (True = active)
    density: float  # final fraction of active units
    granularity: str = "weight"
    grow_scores: torch.Tensor | None = None  # |dense gradient| per unit, for methods that grow by gradient


@dataclass
class Update:
    """A layer's new mask and which units changed (``grown`` units start at zero with no optimizer state)."""

    keep: torch.Tensor
    dropped: torch.Tensor
    grown: torch.Tensor


@dataclass(frozen=True)
class Method(Stage):
    """Common to every sparse-training method."""

    kind: ClassVar[str] = "trainer"
    # the dense gradient of every layer is needed at the steps where an update falls due (RigL)
    grows_by_gradient: ClassVar[bool] = False
    # the dense weight is trained and the mask recomputed from it at every forward (SR-STE)
    straight_through: ClassVar[bool] = False
    # the schedule is in fractions of the run, so the engine must know the run's length
    needs_total_steps: ClassVar[bool] = False
    # an N:M pattern (instead of a sparsity) is accepted
    supports_pattern: ClassVar[bool] = False

    @property
    def unit(self) -> str:
        return getattr(self, "granularity", "weight")

    def initial_keep(
        self, weight: torch.Tensor, density: float, nm: NM | None, generator: torch.Generator
    ) -> torch.Tensor:
        """The mask a layer starts training with (unit shape, on the CPU). Default: random, exact count."""
        shape = M.unit_shape(weight.shape, self.unit)
        if nm is not None:
            return M.random_nm_keep(shape, nm, generator)
        return M.random_mask(shape, density, generator)

    def density_at(self, density: float, step: int, total: int | None) -> float:
        """The density a layer aims for after ``step`` optimizer steps (constant unless the method is gradual)."""
        return density

    def due(self, step: int, total: int | None) -> bool:
        """Whether the masks change after optimizer step ``step`` (1-based)."""
        return False

    def update(self, layer: Layer, step: int, total: int | None, generator: torch.Generator) -> Update:
        """The layer's new mask after optimizer step ``step``; only called when :meth:`due`."""
        raise NotImplementedError


def run_end(fraction: float, total: int | None) -> int:
    """A schedule point given as a fraction of the run, in steps."""
    return int(round(fraction * (total or 0)))
