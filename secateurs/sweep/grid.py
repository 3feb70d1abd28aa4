"""What varies between the cells of a sweep: every combination of pruner, target, allocation, refiner and update."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from secateurs.errors import SecateursError
from secateurs.oneshot.moe import restore_linears, snapshot_linears  # noqa: F401 (the sweep's names for them)
from secateurs.oneshot.recipe import Recipe


def cell_key(recipe: Recipe) -> str:
    """A readable file-name key: ``wanda-0.5-uniform``, ``sparsegpt-2of4-owl-dsnot``, ``wanda-0.7-uniform-admm``."""
    target = recipe.pattern.replace(":", "of") if recipe.pattern else f"{recipe.sparsity:g}"
    allocation = recipe.allocation_name
    if allocation.endswith(".json"):
        allocation = f"file-{Path(allocation).stem}"
    parts = [recipe.method.name, target, allocation] + [s.name for s in (recipe.refine, recipe.update) if s]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


@dataclass
class Grid:
    """What varies between cells; every combination is one cell. ``settings`` (stage name -> its settings) and
    ``exclude`` are shared by every cell."""

    methods: list[str] = field(default_factory=lambda: ["wanda"])
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7])
    patterns: list[str] = field(default_factory=list)
    allocations: list[str] = field(default_factory=lambda: ["uniform"])
    refines: list[str | None] = field(default_factory=lambda: [None])
    updates: list[str | None] = field(default_factory=lambda: [None])
    settings: dict[str, dict] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)

    def recipes(self) -> list[Recipe]:
        """One Recipe per cell (validated: a bad method, sparsity or pattern fails here, before any work)."""
        targets = [{"sparsity": s, "pattern": None} for s in self.sparsities] + [{"pattern": p} for p in self.patterns]
        if not (self.methods and targets and self.allocations and self.refines and self.updates):
            raise SecateursError("the sweep grid is empty: give at least one method, sparsity or pattern, allocation")
        recipes = [
            Recipe.from_dict(
                {
                    "method": method,
                    "allocation": allocation,
                    "refine": refine,
                    "update": update,
                    **target,
                    "exclude": list(self.exclude),
                    "options": self._options(method=method, allocation=allocation, refine=refine, update=update),
                }
            )
            for method in self.methods
            for target in targets
            for allocation in self.allocations
            for refine in self.refines
            for update in self.updates
        ]
        keys = [cell_key(r) for r in recipes]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise SecateursError(f"the sweep grid repeats cell(s): {', '.join(dupes)}")
        return recipes

    def _options(self, **chosen) -> dict:
        return {
            field: dict(self.settings[str(name).lower()])
            for field, name in chosen.items()
            if name is not None and str(name).lower() in self.settings
        }

    def stage_settings(self, recipes: list[Recipe]) -> dict[str, dict]:
        """Every stage of the grid with its full settings (defaults included): what the cells share."""
        out = {}
        for recipe in recipes:
            for stage in recipe.stages():
                if stage.name != "table":
                    out[f"{stage.kind}:{stage.name}"] = stage.options()
        return dict(sorted(out.items()))
