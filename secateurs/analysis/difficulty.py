"""The task-difficulty view of a sweep (the "Junk DNA" question, arXiv 2310.02277): do harder tasks lose more?

For every zero-shot task scored at the cells of a sweep and on the dense model:

* **retained accuracy** at a cell = (pruned acc − chance) / (dense acc − chance): 1 = all of the dense model's
  skill above chance kept, 0 = down to chance. Chance is the task's (declared, or 1/choices averaged over its
  documents; 0 for tasks that are not multiple choice). Undefined when the dense model is at or below chance.
* **essential sparsity** of a task, per series (method, allocation, refinement) = the highest swept sparsity s
  such that retained accuracy is ≥ ``threshold`` (default 0.99) at s and at every lower swept sparsity. When the
  lowest swept sparsity already falls short it is shown as ``< s_min`` (``below``: more than 1% is lost at once);
  when no swept sparsity falls short, as ``≥ s_max`` (``beyond``: it holds at least that far).
* **difficulty order**: tasks with a declared ``metadata: difficulty`` first, easiest (lowest level) first, ties
  broken by dense accuracy (higher first); then tasks without one, by dense accuracy, highest first (lower
  dense accuracy = harder).

Scores are lm-eval's ``acc_norm`` where the task reports it (each choice's summed log-probability divided by its
length in characters: the choices of a task differ in length, and raw sums favour the short ones), else ``acc``;
with lm-eval's standard error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from secateurs.analysis.summary import Results, series_label

RETAINED_THRESHOLD = 0.99
METRICS = ("acc_norm", "acc")  # the first one a task reports is its score


def retained_accuracy(accuracy: float, dense: float, chance: float) -> float | None:
    """(accuracy − chance) / (dense − chance); None when the dense model is not above chance."""
    if dense - chance <= 0:
        return None
    return (accuracy - chance) / (dense - chance)


@dataclass(frozen=True)
class TaskEssential:
    """Essential sparsity of one task for one series (see the module docstring)."""

    sparsity: float
    below: bool = False  # already short of the threshold at the lowest swept sparsity
    beyond: bool = False  # never short of it: holds at least up to ``sparsity``

    def label(self) -> str:
        return f"{'≥ ' if self.beyond else '< ' if self.below else ''}{self.sparsity:.2f}"


def task_essential_sparsity(
    points: Sequence[tuple[float, float | None]], threshold: float = RETAINED_THRESHOLD
) -> TaskEssential | None:
    """Highest swept sparsity up to which every (sparsity, retained accuracy) point is ≥ ``threshold``.

    ``points`` are the pruned cells (any order, sparsity > 0); None when there are none or a retained accuracy is
    undefined. ``below``: the lowest one already falls short (the value is then that lowest sparsity, shown as
    ``< s``); ``beyond``: none does.
    """
    curve = sorted((s, r) for s, r in points if s > 0)
    if not curve or any(r is None for _, r in curve):
        return None
    reached = None
    for sparsity, retained in curve:
        if retained < threshold:
            return TaskEssential(curve[0][0], below=True) if reached is None else TaskEssential(reached)
        reached = sparsity
    return TaskEssential(reached, beyond=True)


@dataclass
class TaskPoint:
    sparsity: float
    accuracy: float
    stderr: float | None
    retained: float | None
    key: str = ""


@dataclass
class TaskRow:
    """One task: what is known of it, the dense score, and its points per series."""

    task: str
    chance: float
    choices: int | None
    difficulty: float | None
    dense: float
    dense_stderr: float | None
    note: str = ""
    examples: int | None = None
    metric: str = "acc"  # the lm-eval metric scored (see METRICS)
    curves: dict[str, list[TaskPoint]] = field(default_factory=dict)  # series -> points by sparsity
    essential: dict[str, TaskEssential | None] = field(default_factory=dict)

    @property
    def order_label(self) -> str:
        return f"level {self.difficulty:g}" if self.difficulty is not None else f"dense acc {self.dense:.3f}"


def _score(zero_shot: dict | None, task: str) -> tuple[float, float | None, int | None, str] | None:
    entry = ((zero_shot or {}).get("tasks") or {}).get(task)
    metric = next((m for m in METRICS if m in (entry or {}).get("metrics", {})), None)
    if metric is None:
        return None
    stderr = entry.get("stderr", {}).get(metric)
    error = stderr if isinstance(stderr, (int, float)) else None
    return entry["metrics"][metric], error, entry.get("examples"), metric


def task_rows(results: Results, threshold: float = RETAINED_THRESHOLD) -> list[TaskRow]:
    """Every task scored on the dense model, in difficulty order (easiest first), with its curves per series.

    Only unstructured cells make curves (N:M cells have no sparsity axis); empty when no task was scored.
    """
    dense_scores = results.dense_zero_shot or {}
    facts = results.task_facts or {}
    rows = []
    for task in dense_scores.get("tasks") or {}:
        score = _score(dense_scores, task)
        if score is None:
            continue
        info = facts.get(task, {})
        chance = float(info.get("chance") or 0.0)
        row = TaskRow(
            task=task,
            chance=chance,
            choices=info.get("choices"),
            difficulty=info.get("difficulty"),
            dense=score[0],
            dense_stderr=score[1],
            note=info.get("note", ""),
            examples=score[2],
            metric=score[3],
        )
        for cell in results.cells:
            recipe = cell["recipe"]
            point = _score(cell.get("zero_shot"), task)
            if recipe.get("pattern") or point is None:
                continue
            retained = retained_accuracy(point[0], row.dense, chance)
            row.curves.setdefault(series_label(recipe), []).append(
                TaskPoint(recipe["sparsity"], point[0], point[1], retained, cell["key"])
            )
        for series, points in row.curves.items():
            points.sort(key=lambda p: p.sparsity)
            row.essential[series] = task_essential_sparsity([(p.sparsity, p.retained) for p in points], threshold)
        rows.append(row)
    return sorted(rows, key=difficulty_key)


def difficulty_key(row: TaskRow):
    """Declared difficulty first (easiest first, then by dense accuracy), then undeclared by dense accuracy."""
    if row.difficulty is not None:
        return (0, row.difficulty, -row.dense, row.task)
    return (1, 0.0, -row.dense, row.task)


def difficulty_summary(results: Results, threshold: float = RETAINED_THRESHOLD) -> dict:
    """The view as JSON (in a sweep's ``results.json``): per task its facts, dense score, points, essential sparsity."""
    return {
        "metric": "acc_norm where the task has it, else acc",
        "retained_threshold": threshold,
        "order": "declared difficulty (easiest first), then dense accuracy (highest first)",
        "tasks": [
            {
                "task": row.task,
                "difficulty": row.difficulty,
                "chance": row.chance,
                "chance_note": row.note,
                "choices": row.choices,
                "examples": row.examples,
                "metric": row.metric,
                "dense": {"acc": row.dense, "stderr": row.dense_stderr},
                "series": {
                    series: {
                        "points": [
                            {"sparsity": p.sparsity, "acc": p.accuracy, "stderr": p.stderr, "retained": p.retained}
                            for p in points
                        ],
                        "essential_sparsity": None
                        if row.essential.get(series) is None
                        else {
                            "sparsity": row.essential[series].sparsity,
                            "below_grid": row.essential[series].below,
                            "beyond_grid": row.essential[series].beyond,
                        },
                    }
                    for series, points in row.curves.items()
                },
            }
            for row in task_rows(results, threshold)
        ],
    }
