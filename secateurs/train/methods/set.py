"""Sparse Evolutionary Training (Mocanu et al. 2018): every ``interval`` steps each layer drops the fraction
``zeta`` of its active weights with the smallest magnitude and regrows as many at random; regrown weights
start at zero. The schedule runs until ``end`` (a fraction of the run) so the masks settle before it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateurs.oneshot.stage import option
from secateurs.train import masks as M
from secateurs.train import schedules
from secateurs.train.method import Layer, Method, Update, run_end


@dataclass(frozen=True)
class SET(Method):
    """Magnitude drop, random regrowth, on a fixed interval."""

    name: ClassVar[str] = "set"
    summary: ClassVar[str] = "drop smallest magnitudes, regrow at random (Mocanu et al.)"
    needs_total_steps: ClassVar[bool] = True

    zeta: float = option(0.3, "fraction of each layer's active weights replaced at an update")
    interval: int = option(100, "steps between mask updates")
    end: float = option(0.75, "last mask update, as a fraction of the run")
    decay: str = option("constant", "how zeta changes over the run: constant (the paper) or cosine (as RigL)")
    granularity: str = option("weight", "unit of sparsity: weight, or kernel (a whole conv kernel per channel pair)")

    def __post_init__(self) -> None:
        self.check(0 < self.zeta < 1, f"zeta must be in (0, 1), got {self.zeta}")
        self.check(self.interval >= 1, f"interval must be >= 1, got {self.interval}")
        self.check(0 < self.end <= 1, f"end must be in (0, 1], got {self.end}")
        self.check(self.decay in ("constant", "cosine"), f"decay must be constant or cosine, got {self.decay!r}")
        self.check(
            self.granularity in M.GRANULARITIES, f"granularity must be weight or kernel, not {self.granularity!r}"
        )

    def fraction(self, step: int, total: int | None) -> float:
        end = run_end(self.end, total)
        if self.decay == "cosine":
            return schedules.cosine_fraction(step, self.zeta, end)
        return schedules.constant_fraction(step, self.zeta, end)

    def due(self, step: int, total: int | None) -> bool:
        return schedules.on_interval(step, self.interval, 0, run_end(self.end, total) - 1)

    def grow_scores(self, layer: Layer, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(tuple(layer.keep.shape), generator=generator).to(layer.keep.device)

    def update(self, layer: Layer, step: int, total: int | None, generator: torch.Generator) -> Update:
        count = int(self.fraction(step, total) * int(layer.keep.sum()))  # floor, as the references
        drop = M.unit_scores(layer.weight, self.unit).to(layer.keep.device)
        keep, dropped, grown = M.drop_and_grow(layer.keep, drop, self.grow_scores(layer, generator), count)
        return Update(keep, dropped, grown)
