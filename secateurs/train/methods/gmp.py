"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune").

Training starts dense; every ``interval`` steps from ``begin`` to ``end`` (fractions of the run) each layer is
pruned to s_t = s_f + (s_i - s_f)(1 - (t - t_0)/(n dt))^3 by weight magnitude. A pruned weight is zero and stays
out, so the masks only shrink (the reference recomputes the mask from the masked weights, which amounts to the
same). Each layer follows the schedule towards its own final density (uniform or ERK).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateurs.oneshot.select import NM
from secateurs.oneshot.stage import option
from secateurs.train import masks as M
from secateurs.train import schedules
from secateurs.train.method import Layer, Method, Update, run_end


@dataclass(frozen=True)
class GMP(Method):
    """Cubic-schedule gradual magnitude pruning from ``initial`` sparsity to the target."""

    name: ClassVar[str] = "gmp"
    summary: ClassVar[str] = "gradual magnitude pruning on Zhu & Gupta's cubic schedule"
    needs_total_steps: ClassVar[bool] = True

    initial: float = option(0.0, "sparsity at the start of pruning (s_i)")
    begin: float = option(0.0, "when pruning starts, as a fraction of the run (t_0)")
    end: float = option(0.75, "when the final sparsity is reached, as a fraction of the run (t_0 + n dt)")
    interval: int = option(100, "steps between pruning events (dt)")
    granularity: str = option("weight", "unit of sparsity: weight, or kernel (a whole conv kernel per channel pair)")

    def __post_init__(self) -> None:
        self.check(0 <= self.initial < 1, f"initial must be in [0, 1), got {self.initial}")
        self.check(0 <= self.begin < self.end <= 1, f"need 0 <= begin < end <= 1, got {self.begin}, {self.end}")
        self.check(self.interval >= 1, f"interval must be >= 1, got {self.interval}")
        self.check(
            self.granularity in M.GRANULARITIES, f"granularity must be weight or kernel, not {self.granularity!r}"
        )

    def _window(self, total: int | None) -> tuple[int, int]:
        return run_end(self.begin, total), max(run_end(self.end, total), run_end(self.begin, total) + 1)

    def initial_keep(self, weight: torch.Tensor, density: float, nm: NM | None, generator: torch.Generator):
        return M.top_mask(M.unit_scores(weight.detach().cpu(), self.unit), 1.0 - self.initial)

    def density_at(self, density: float, step: int, total: int | None) -> float:
        begin, end = self._window(total)
        return 1.0 - schedules.cubic_sparsity(step, self.initial, 1.0 - density, begin, end)

    def due(self, step: int, total: int | None) -> bool:
        begin, end = self._window(total)
        return schedules.on_interval(step, self.interval, begin, end) or step == end

    def update(self, layer: Layer, step: int, total: int | None, generator: torch.Generator) -> Update:
        density = self.density_at(layer.density, step, total)
        scores = M.unit_scores(layer.weight, self.unit).to(layer.keep.device)
        count = min(M.kept_count(layer.keep.numel(), density), int(layer.keep.sum()))
        keep = M._highest(scores, count, layer.keep)
        return Update(keep, layer.keep & ~keep, torch.zeros_like(keep))
