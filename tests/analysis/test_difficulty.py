"""The task-difficulty view: retained accuracy, per-task essential sparsity, the difficulty order, the page section.

Hand-made cells only (no model): the numbers are chosen so every value can be checked by hand.
"""

from __future__ import annotations

import pytest

from secateurs.analysis.difficulty import (
    TaskEssential,
    difficulty_summary,
    retained_accuracy,
    task_essential_sparsity,
    task_rows,
)
from secateurs.analysis.html import render_page
from secateurs.analysis.summary import Results


def test_retained_accuracy_by_hand():
    assert retained_accuracy(0.75, 0.75, 0.25) == 1.0  # all of the dense skill kept
    assert retained_accuracy(0.25, 0.75, 0.25) == 0.0  # down to chance
    assert retained_accuracy(0.5, 0.75, 0.25) == pytest.approx(0.5)  # (0.5 - 0.25) / (0.75 - 0.25)
    assert retained_accuracy(0.2, 0.75, 0.25) == pytest.approx(-0.1)  # below chance is negative
    assert retained_accuracy(0.6, 0.5, 0.0) == pytest.approx(1.2)  # a pruned model may beat the dense one
    assert retained_accuracy(0.6, 0.25, 0.25) is None  # dense at chance: nothing to retain
    assert retained_accuracy(0.6, 0.2, 0.25) is None


def test_task_essential_sparsity_by_hand():
    # holds at 0.2 and 0.4, falls short at 0.5: essential sparsity 0.4 (even though 0.6 recovers)
    assert task_essential_sparsity([(0.5, 0.9), (0.2, 1.0), (0.4, 0.995), (0.6, 1.0)]) == TaskEssential(0.4)
    # exactly at the threshold counts as kept
    assert task_essential_sparsity([(0.2, 0.99), (0.4, 0.98)]) == TaskEssential(0.2)
    # already short at the lowest swept sparsity: below the grid, labelled "< 0.20"
    below = task_essential_sparsity([(0.2, 0.95), (0.4, 1.0)])
    assert below == TaskEssential(0.2, below=True) and below.label() == "< 0.20"
    # never short: beyond the grid, labelled "≥ 0.70"
    beyond = task_essential_sparsity([(0.7, 1.01), (0.2, 1.0)])
    assert beyond == TaskEssential(0.7, beyond=True) and beyond.label() == "≥ 0.70"
    # another threshold
    assert task_essential_sparsity([(0.2, 0.96), (0.4, 0.9)], threshold=0.95) == TaskEssential(0.2)
    # nothing measured, or a retained accuracy undefined (dense at chance): no essential sparsity
    assert task_essential_sparsity([]) is None
    assert task_essential_sparsity([(0.2, None), (0.4, 1.0)]) is None
    assert task_essential_sparsity([(0.0, 1.0)]) is None  # the dense point is not a swept sparsity


def _task(acc: float, stderr: float = 0.05, acc_norm: float | None = None) -> dict:
    metrics = {"acc": acc} if acc_norm is None else {"acc": acc, "acc_norm": acc_norm}
    return {"metrics": metrics, "stderr": {m: stderr for m in metrics}, "examples": 100}


def _cell(method: str, sparsity: float, scores: dict, pattern: str | None = None) -> dict:
    key = f"{method}-{pattern.replace(':', 'of') if pattern else sparsity}-uniform"
    return {
        "key": key,
        "recipe": {"method": method, "sparsity": sparsity, "allocation": "uniform", "pattern": pattern},
        "report": {"sparsity": sparsity, "layers": [], "prune_seconds": 1.0},
        "perplexity": {"perplexity": 10.0 + 10 * sparsity},
        "zero_shot": {"tasks": {name: _task(*value) for name, value in scores.items()}},
    }


def hand_made() -> Results:
    """Three tasks: easy (2 choices, level 1), hard (4 choices, level 4), mystery (no level, 4 choices)."""
    facts = {
        "easy": {"chance": 0.5, "choices": 2, "difficulty": 1, "note": "declared"},
        "hard": {"chance": 0.25, "choices": 4, "difficulty": 4, "note": "declared"},
        "mystery": {"chance": 0.25, "choices": 4, "difficulty": None, "note": "1/choices"},
    }
    dense = {"easy": (0.9,), "hard": (0.65,), "mystery": (0.3, 0.05, 0.45)}  # mystery scored by acc_norm
    cells = [
        _cell("wanda", 0.2, {"easy": (0.9,), "hard": (0.65,), "mystery": (0.0, 0.05, 0.45)}),
        _cell("wanda", 0.5, {"easy": (0.9,), "hard": (0.45,), "mystery": (0.0, 0.05, 0.35)}),
        _cell("magnitude", 0.2, {"easy": (0.7,), "hard": (0.45,), "mystery": (0.0, 0.05, 0.25)}),
        _cell("wanda", 0.5, {"easy": (0.5,), "hard": (0.25,)}, pattern="2:4"),  # N:M: no curve
    ]
    return Results(
        kind="sweep",
        model="hand-made",
        cells=cells,
        dense_perplexity={"perplexity": 10.0, "protocol": "p"},
        dense_zero_shot={"tasks": {name: _task(*value) for name, value in dense.items()}},
        task_facts=facts,
    )


def test_task_rows_order_retained_and_essential():
    rows = task_rows(hand_made())
    assert [row.task for row in rows] == ["easy", "hard", "mystery"]  # declared levels first, then dense accuracy
    easy, hard, mystery = rows
    assert (easy.order_label, mystery.order_label) == ("level 1", "dense acc 0.450")
    assert mystery.dense == 0.45  # acc_norm preferred where the task reports it
    assert [(p.sparsity, p.retained) for p in easy.curves["wanda"]] == [(0.2, 1.0), (0.5, 1.0)]
    assert [p.retained for p in hard.curves["wanda"]] == pytest.approx([1.0, 0.5])  # (0.45-0.25)/(0.65-0.25)
    assert easy.curves["magnitude"][0].retained == pytest.approx(0.5)  # (0.7-0.5)/(0.9-0.5)
    assert mystery.curves["wanda"][1].retained == pytest.approx(0.5)  # (0.35-0.25)/(0.45-0.25)
    assert easy.essential == {"wanda": TaskEssential(0.5, beyond=True), "magnitude": TaskEssential(0.2, below=True)}
    assert hard.essential["wanda"] == TaskEssential(0.2)
    assert all(p.key != "wanda-2of4-uniform" for row in rows for p in row.curves["wanda"])


def test_difficulty_order_without_declared_levels_is_dense_accuracy():
    results = hand_made()
    results.task_facts = {name: {**f, "difficulty": None} for name, f in results.task_facts.items()}
    assert [row.task for row in task_rows(results)] == ["easy", "hard", "mystery"]  # 0.9, 0.65, 0.45
    results.task_facts["mystery"]["difficulty"] = 0.5  # a declared level beats any dense accuracy
    assert [row.task for row in task_rows(results)] == ["mystery", "easy", "hard"]


def test_difficulty_summary_and_page_section():
    results = hand_made()
    summary = difficulty_summary(results)
    assert summary["retained_threshold"] == 0.99
    hard = next(t for t in summary["tasks"] if t["task"] == "hard")
    assert hard["chance"] == 0.25 and hard["difficulty"] == 4 and hard["dense"] == {"acc": 0.65, "stderr": 0.05}
    assert hard["series"]["wanda"]["essential_sparsity"] == {"sparsity": 0.2, "below_grid": False, "beyond_grid": False}
    page = render_page(results)
    section = page[page.index('<section id="difficulty">') :]
    section = section[: section.index("</section>")]
    assert 'id="fig-difficulty"' in section and 'id="difficulty-table"' in section
    assert section.index('data-task="easy"') < section.index('data-task="hard"') < section.index('data-task="mystery"')
    assert "(pruned acc − chance) / (dense acc − chance)" in section and "≥ 0.99" in section
    assert "Essential sparsity" in section and "metadata: difficulty" in section
    assert section.count('class="difficulty-series"') == 2  # one table per method


def test_page_without_tasks_has_no_difficulty_view():
    results = hand_made()
    results.dense_zero_shot = None
    assert task_rows(results) == []
    assert 'id="difficulty"' not in render_page(results)
