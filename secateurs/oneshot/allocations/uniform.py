"""Every decoder layer gets the recipe's target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from secateurs.oneshot.stage import Allocation


@dataclass(frozen=True)
class Uniform(Allocation):
    name: ClassVar[str] = "uniform"
    summary: ClassVar[str] = "every decoder layer pruned to the target"

    def allocate(self, target: float, layer_names: list[str], measures: list[dict] | None) -> list[float]:
        return [float(target)] * len(layer_names)
