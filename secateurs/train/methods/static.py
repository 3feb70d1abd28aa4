"""Static sparse training: a mask fixed at the start, random or by magnitude (Liu et al. 2022, "The Unreasonable
Effectiveness of Random Pruning": a random mask with ERK layer densities, trained from scratch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateurs.oneshot.select import NM
from secateurs.oneshot.stage import option
from secateurs.train import masks as M
from secateurs.train.method import Method


@dataclass(frozen=True)
class Static(Method):
    """A fixed mask: ``init="random"`` (uniformly random, exact count per layer) or ``"magnitude"`` (largest |W|)."""

    name: ClassVar[str] = "static"
    summary: ClassVar[str] = "fixed mask from the start: random or largest magnitude"
    supports_pattern: ClassVar[bool] = True

    init: str = option("random", "initial mask: random or magnitude (of the weights the model has)")
    granularity: str = option("weight", "unit of sparsity: weight, or kernel (a whole conv kernel per channel pair)")

    def __post_init__(self) -> None:
        self.check(self.init in ("random", "magnitude"), f"init must be random or magnitude, got {self.init!r}")
        self.check(
            self.granularity in M.GRANULARITIES, f"granularity must be weight or kernel, not {self.granularity!r}"
        )

    def initial_keep(self, weight: torch.Tensor, density: float, nm: NM | None, generator: torch.Generator):
        if self.init == "random":
            return super().initial_keep(weight, density, nm, generator)
        if nm is not None:
            return M.nm_keep(weight.detach().cpu(), nm)
        return M.top_mask(M.unit_scores(weight.detach().cpu(), self.unit), density)
