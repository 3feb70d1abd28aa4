"""``secateurs sweep --tasks`` on a tiny offline model: task scores in every cell and on the dense model, the
task-difficulty view on the page, resuming without rescoring, and a bad task name refused before any pruning."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import run_main

import secateurs.sweep.run
from secateurs.sweep import cell_key

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval")

FAST = ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--quiet"]
TASKS = ["--tasks", "bible_next_2_far,bible_next_4_near", "--limit", "3", "--batch-size", "4"]
GRID = ["--methods", "magnitude,wanda", "--sparsities", "0.5,0.7"]


def sweep_args(model_dir, text_file, out, *extra) -> list:
    return ["sweep", model_dir, "--calibration", text_file, "--eval", text_file, *FAST, *TASKS, "--output", out, *extra]


class Counting:
    """Wraps a function of secateurs.sweep.run, records each call; raises KeyboardInterrupt on call ``fail_on``."""

    def __init__(self, real, name, fail_on=None):
        self.real, self.name, self.calls, self.fail_on = real, name, [], fail_on

    def __call__(self, *args, **kwargs):
        self.calls.append(cell_key(args[1]) if self.name == "prune" else "score")
        if len(self.calls) == self.fail_on:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


@pytest.fixture(scope="module")
def finished(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep-tasks") / "sweep"
    code, _, stderr = run_main(*sweep_args(tiny_model_dir, text_file, out, *GRID))
    assert code == 0, stderr
    return out


def test_every_cell_and_the_dense_model_have_task_scores(finished):
    cells = {p.stem: json.loads(p.read_text()) for p in (finished / "cells").glob("*.json")}
    assert set(cells) == {
        "dense",
        "magnitude-0.5-uniform",
        "magnitude-0.7-uniform",
        "wanda-0.5-uniform",
        "wanda-0.7-uniform",
    }
    for cell in cells.values():
        scores = cell["zero_shot"]
        assert set(scores["tasks"]) == {"bible_next_2_far", "bible_next_4_near"} and scores["limit"] == 3
        for task in scores["tasks"].values():
            assert task["examples"] == 3 and 0 <= task["metrics"]["acc"] <= 1 and "acc_norm" in task["stderr"]
    facts = cells["dense"]["task_facts"]
    assert facts["bible_next_2_far"]["chance"] == 0.5 and facts["bible_next_4_near"]["difficulty"] == 4
    settings = json.loads((finished / "sweep.json").read_text())["settings"]
    assert settings["evaluation"]["tasks"] == {
        "names": ["bible_next_2_far", "bible_next_4_near"],
        "limit": 3,
        "num_fewshot": 0,
    }
    summary = json.loads((finished / "results.json").read_text())
    view = summary["task_difficulty"]
    assert [t["task"] for t in view["tasks"]] == ["bible_next_2_far", "bible_next_4_near"]  # easiest first
    for task in view["tasks"]:
        assert set(task["series"]) == {"magnitude", "wanda"}
        assert [p["sparsity"] for p in task["series"]["wanda"]["points"]] == [0.5, 0.7]


def test_page_has_the_difficulty_view(finished):
    page = (finished / "report.html").read_text()
    assert '<section id="difficulty">' in page and 'id="difficulty-table"' in page
    assert 'data-task="bible_next_2_far"' in page and 'data-task="bible_next_4_near"' in page
    assert page.count('class="difficulty-series"') == 2


def test_finished_sweep_with_tasks_rescores_nothing(finished, tiny_model_dir, text_file, monkeypatch):
    prune = Counting(secateurs.sweep.run.prune, "prune")
    score = Counting(secateurs.sweep.run.zero_shot, "score")
    monkeypatch.setattr(secateurs.sweep.run, "prune", prune)
    monkeypatch.setattr(secateurs.sweep.run, "zero_shot", score)
    before = {p.name: p.read_bytes() for p in (finished / "cells").glob("*.json")}
    code, _, stderr = run_main(*sweep_args(tiny_model_dir, text_file, finished, *GRID))
    assert code == 0, stderr
    assert prune.calls == [] and score.calls == []
    assert {p.name: p.read_bytes() for p in (finished / "cells").glob("*.json")} == before


def test_interrupted_sweep_with_tasks_resumes_without_rescoring(tiny_model_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    grid = ["--methods", "magnitude", "--sparsities", "0.5,0.7"]
    prune = Counting(secateurs.sweep.run.prune, "prune", fail_on=2)
    score = Counting(secateurs.sweep.run.zero_shot, "score")
    monkeypatch.setattr(secateurs.sweep.run, "prune", prune)
    monkeypatch.setattr(secateurs.sweep.run, "zero_shot", score)
    code, _, _ = run_main(*sweep_args(tiny_model_dir, text_file, out, *grid))
    assert code == 130
    assert len(score.calls) == 2  # the dense model and the first cell
    first = (out / "cells" / "magnitude-0.5-uniform.json").read_bytes()

    prune = Counting(secateurs.sweep.run.prune, "prune")
    score = Counting(secateurs.sweep.run.zero_shot, "score")
    monkeypatch.setattr(secateurs.sweep.run, "prune", prune)
    monkeypatch.setattr(secateurs.sweep.run, "zero_shot", score)
    code, _, stderr = run_main(*sweep_args(tiny_model_dir, text_file, out, *grid))
    assert code == 0, stderr
    assert prune.calls == ["magnitude-0.7-uniform"] and len(score.calls) == 1  # only the missing cell
    assert (out / "cells" / "magnitude-0.5-uniform.json").read_bytes() == first
    assert "zero_shot" in json.loads((out / "cells" / "magnitude-0.7-uniform.json").read_text())


def test_other_tasks_are_other_settings(finished, tiny_model_dir, text_file):
    args = sweep_args(tiny_model_dir, text_file, finished, *GRID)
    args[args.index("--limit") + 1] = "4"
    code, stdout, stderr = run_main(*args)
    assert code == 2 and stdout == ""
    assert "evaluation.tasks.limit: 3 -> 4" in stderr and "--fresh" in stderr


def test_bad_task_name_is_one_error_line_before_any_pruning(tiny_model_dir, text_file, tmp_path, monkeypatch):
    prune = Counting(secateurs.sweep.run.prune, "prune")
    monkeypatch.setattr(secateurs.sweep.run, "prune", prune)
    loads = []
    monkeypatch.setattr(secateurs.sweep.run, "load_model", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    out = tmp_path / "sweep"
    args = sweep_args(tiny_model_dir, text_file, out, "--methods", "magnitude", "--sparsities", "0.5")
    args[args.index("--tasks") + 1] = "bible_next_2_far,bible_next_4_nearr"
    code, stdout, stderr = run_main(*args)
    assert code == 2 and stdout == ""
    errors = [line for line in stderr.splitlines() if line.startswith("secateurs: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert "unknown zero-shot task 'bible_next_4_nearr'" in errors[0] and "bible_next_4_near" in errors[0]
    assert prune.calls == [] and loads == [] and not out.exists()
