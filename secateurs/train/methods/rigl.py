"""RigL (Evci et al. 2020, "Rigging the Lottery"): every ``interval`` steps until T_end, each layer drops the
f_t = alpha/2 (1 + cos(pi t / T_end)) fraction of its active weights with the smallest magnitude and grows as
many inactive ones with the largest dense-gradient magnitude (the gradient of that step only); grown weights
start at zero and their optimizer state is reset. Counts are kept per layer.

As in the reference (google-research/rigl ``sparse_optimizers_base.py``): per-layer drop count floor(f_t * active),
the just-dropped are candidates for regrowth, and a weight dropped and regrown in one update keeps its value.
Differences: the reference skips the optimizer step at an update step; here the optimizer steps as usual
(``optimizer.step(); sparse.step()``) and the update uses the weights after that step and the gradient it took.
The optimizer state of dropped weights is zeroed too (the reference leaves it; the weights are masked anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateurs.errors import SecateursError
from secateurs.oneshot.stage import option
from secateurs.train import masks as M
from secateurs.train import schedules
from secateurs.train.method import Layer, Method, Update, run_end


@dataclass(frozen=True)
class RigL(Method):
    """Magnitude drop, gradient regrowth, cosine-decayed update fraction."""

    name: ClassVar[str] = "rigl"
    summary: ClassVar[str] = "drop smallest magnitudes, grow largest gradients (Evci et al.)"
    needs_total_steps: ClassVar[bool] = True
    grows_by_gradient: ClassVar[bool] = True

    alpha: float = option(0.3, "initial update fraction (f_0), decayed by a cosine to 0 at T_end")
    interval: int = option(100, "steps between mask updates (delta T)")
    end: float = option(0.75, "T_end: last mask update, as a fraction of the run")
    granularity: str = option("weight", "unit of sparsity: weight, or kernel (a whole conv kernel per channel pair)")

    def __post_init__(self) -> None:
        self.check(0 < self.alpha < 1, f"alpha must be in (0, 1), got {self.alpha}")
        self.check(self.interval >= 1, f"interval must be >= 1, got {self.interval}")
        self.check(0 < self.end <= 1, f"end must be in (0, 1], got {self.end}")
        self.check(
            self.granularity in M.GRANULARITIES, f"granularity must be weight or kernel, not {self.granularity!r}"
        )

    def fraction(self, step: int, total: int | None) -> float:
        return schedules.cosine_fraction(step, self.alpha, run_end(self.end, total))

    def due(self, step: int, total: int | None) -> bool:
        return schedules.on_interval(step, self.interval, 0, run_end(self.end, total) - 1)

    def update(self, layer: Layer, step: int, total: int | None, generator: torch.Generator) -> Update:
        if not self.grows_by_gradient:
            grow = torch.rand(tuple(layer.keep.shape), generator=generator).to(layer.keep.device)
        elif layer.grow_scores is None:
            raise SecateursError(f"{self.name}: no gradient was recorded for {layer.name} at step {step}")
        else:
            grow = layer.grow_scores.to(layer.keep.device)
        count = int(self.fraction(step, total) * int(layer.keep.sum()))  # floor, as the references
        drop = M.unit_scores(layer.weight, self.unit).to(layer.keep.device)
        keep, dropped, grown = M.drop_and_grow(layer.keep, drop, grow, count)
        return Update(keep, dropped, grown)
