"""Pruning results as tables: one row per cell, curves per series, the essential-sparsity knee, best per target.

A *cell* is one pruned configuration: ``{"key", "recipe", "report" (PruneReport dict), "perplexity"
(PerplexityResult dict or None)}``. A *series* is every cell with the same method, allocation and refinement;
its unstructured cells form a perplexity-vs-sparsity curve that starts at the dense model (sparsity 0).

Essential sparsity (the knee): the sparsity at which a curve first rises above ``(1 + tolerance)`` times the
dense perplexity, with the curve interpolated linearly in log-perplexity between measured sparsities. Below it
the model is almost free to prune; above it quality falls off. Only measured points are interpolated: if the
first measured sparsity is already above the limit, the knee lies below the grid (``Knee.below``: lower
sparsities must be measured to place it); if none is, it lies beyond the grid (``Knee.beyond``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TOLERANCE = 0.2  # essential sparsity: perplexity within +20% of dense


@dataclass(frozen=True)
class Knee:
    """Essential sparsity of one curve; ``threshold`` is the perplexity limit (1 + tolerance) x dense."""

    sparsity: float
    threshold: float
    beyond: bool = False  # no measured point crossed the limit: the knee is above ``sparsity``
    below: bool = False  # the first measured point is already above the limit: the knee is below ``sparsity``

    @property
    def exact(self) -> bool:
        return not (self.beyond or self.below)

    def label(self) -> str:
        return f"{'≥ ' if self.beyond else '< ' if self.below else ''}{self.sparsity:.2f}"


def essential_sparsity(
    points: Sequence[tuple[float, float]], dense: float, tolerance: float = DEFAULT_TOLERANCE
) -> Knee:
    """The knee of a perplexity-vs-sparsity curve (see the module docstring).

    ``points`` are (sparsity, perplexity) pairs of the pruned cells (any order); the dense model is the point
    (0, ``dense``). Returns the interpolated sparsity where log-perplexity crosses log((1 + tolerance) x dense).
    The segment from the dense model to the first measured point is not interpolated: perplexity is typically
    flat and then bends up, so a straight line from sparsity 0 would place the knee far too low.
    """
    if dense <= 0 or tolerance < 0:
        raise ValueError(f"need a positive dense perplexity and tolerance >= 0, got {dense}, {tolerance}")
    threshold = (1 + tolerance) * dense
    curve = [(0.0, dense), *sorted((s, p) for s, p in points if s > 0)]
    for (s0, p0), (s1, p1) in zip(curve, curve[1:], strict=False):
        if not (p1 > threshold or math.isnan(p1)):
            continue
        if s0 == 0.0:
            return Knee(s1, threshold, below=True)
        if not math.isfinite(p1):  # a diverged model: the knee is the last good point
            return Knee(s0, threshold)
        t = (math.log(threshold) - math.log(p0)) / (math.log(p1) - math.log(p0)) if p0 < threshold else 0.0
        return Knee(s0 + t * (s1 - s0), threshold)
    return Knee(curve[-1][0], threshold, beyond=True)


# ------------------------------------------------------------------------------------------ cells and rows
def allocation_label(allocation: str) -> str:
    return allocation if allocation in ("uniform", "owl") else Path(allocation).name


def series_label(recipe: dict) -> str:
    """``wanda``, ``wanda + owl``, ``sparsegpt + owl + dsnot``: method, then what differs from the default."""
    parts = [recipe["method"]]
    if recipe.get("allocation", "uniform") != "uniform":
        parts.append(allocation_label(recipe["allocation"]))
    for stage in ("refine", "update"):
        if recipe.get(stage):
            parts.append(recipe[stage])
    return " + ".join(parts)


def owl_m(recipe: dict) -> float | None:
    """OWL's outlier threshold M in a recipe dict (current or flat legacy form), None when not OWL."""
    if recipe.get("allocation") != "owl":
        return None
    return (recipe.get("options") or {}).get("allocation", {}).get("m", recipe.get("owl_m"))


def target_label(recipe: dict) -> str:
    return recipe["pattern"] if recipe.get("pattern") else f"{recipe['sparsity']:g}"


def mean_output_error(report: dict) -> float | None:
    errors = [layer["output_error"] for layer in report["layers"] if layer.get("output_error") is not None]
    return sum(errors) / len(errors) if errors else None


@dataclass
class Results:
    """Everything a page shows: the dense model (perplexity, outlier profile) and the pruned cells."""

    kind: str  # "sweep" (a grid) or "folder" (one pruned output)
    model: str
    cells: list[dict]
    dense_perplexity: dict | None = None  # PerplexityResult dict of the dense model
    outlier_ratios: list[float] | None = None  # per decoder layer, from a dense pass (OWL's D_l)
    dense_zero_shot: dict | None = None  # ZeroShotResult dict of the dense model (sweeps with --tasks)
    task_facts: dict | None = None  # task -> TaskFacts dict (chance, choices, declared difficulty)
    settings: dict = field(default_factory=dict)  # shared protocol, shown on the page
    title: str = ""

    @property
    def dense(self) -> float | None:
        return self.dense_perplexity["perplexity"] if self.dense_perplexity else None

    def rows(self) -> list[dict]:
        """One flat row per cell, sorted by target (unstructured first, by sparsity; then N:M), then perplexity.

        ``best`` marks the lowest perplexity among the cells of the same target.
        """
        rows = []
        for cell in self.cells:
            recipe, report, ppl = cell["recipe"], cell["report"], cell.get("perplexity")
            perplexity = ppl["perplexity"] if ppl else None
            rows.append(
                {
                    "key": cell["key"],
                    "series": series_label(recipe),
                    "method": recipe["method"],
                    "allocation": allocation_label(recipe.get("allocation", "uniform")),
                    "refine": recipe.get("refine") or "none",
                    "update": recipe.get("update") or "none",
                    "target": target_label(recipe),
                    "pattern": recipe.get("pattern"),
                    "sparsity_target": recipe["sparsity"],
                    "sparsity": report["sparsity"],
                    "perplexity": perplexity,
                    "vs_dense": perplexity / self.dense if perplexity is not None and self.dense else None,
                    "mean_output_error": mean_output_error(report),
                    "prune_seconds": report["prune_seconds"],
                    "eval_seconds": cell.get("eval_seconds"),
                    "best": False,
                }
            )
        rows.sort(key=_row_order)
        best: dict[str, dict] = {}
        for row in rows:
            if row["perplexity"] is None or math.isnan(row["perplexity"]):
                continue
            if row["target"] not in best or row["perplexity"] < best[row["target"]]["perplexity"]:
                best[row["target"]] = row
        if len(rows) > 1:
            for row in best.values():
                row["best"] = True
        return rows

    def curves(self) -> dict[str, list[tuple[float, float]]]:
        """Per series, the (target sparsity, perplexity) points of its unstructured cells, sorted by sparsity."""
        out: dict[str, list[tuple[float, float]]] = {}
        for row in self.rows():
            if row["pattern"] is None and row["perplexity"] is not None:
                out.setdefault(row["series"], []).append((row["sparsity_target"], row["perplexity"]))
        order = {name: i for i, name in enumerate(sorted({r["series"] for r in self.rows()}, key=_series_order))}
        return {name: sorted(out[name]) for name in sorted(out, key=order.get)}

    def knees(self, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Knee]:
        """Essential sparsity per series (needs the dense perplexity)."""
        if not self.dense:
            return {}
        return {name: essential_sparsity(points, self.dense, tolerance) for name, points in self.curves().items()}

    def layer_names(self) -> list[str]:
        for cell in self.cells:
            return [layer["name"] for layer in cell["report"]["layers"]]
        return []


METHOD_ORDER = ("magnitude", "wanda", "sparsegpt")


def _series_order(label: str):
    """Methods in the order of the papers (magnitude, Wanda, SparseGPT), then plain before allocation/refinement."""
    method, *rest = label.split(" + ")
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method, len(rest), rest)


def _row_order(row: dict):
    pattern = row["pattern"]
    nm = tuple(int(x) for x in pattern.split(":")) if pattern else (0, 0)
    ppl = row["perplexity"]
    return (pattern is not None, row["sparsity_target"], nm[1], ppl is None, ppl if ppl is not None else 0.0)
