"""``secateurs sweep`` on a tiny offline model: the table, resuming after an interruption, settings checks, the knee.

The sweep runs in-process through ``secateurs.cli.main``; interruptions are simulated by a ``prune`` that raises
KeyboardInterrupt, as Ctrl-C would, in the middle of a cell.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import run_main
from transformers import AutoModelForCausalLM, AutoTokenizer

import secateurs.api
import secateurs.sweep.run
from secateurs.analysis.summary import Knee, Results, essential_sparsity
from secateurs.data.calibration import Calibration
from secateurs.errors import SecateursError
from secateurs.oneshot.recipe import Recipe
from secateurs.sweep import Grid, cell_key, restore_linears, settings_differences, snapshot_linears

FAST = ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "3", "--quiet"]


def sweep_args(model_dir, text_file, out, *grid) -> list:
    return ["sweep", model_dir, "--calibration", text_file, "--eval", text_file, *FAST, "--output", out, *grid]


def assert_clean(out: Path) -> None:
    """No temporary files anywhere, and every JSON file parses."""
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, leftovers
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    assert (out / "report.html").read_text().rstrip().endswith("</html>")


class CountingPrune:
    """Wraps secateurs.api.prune: counts calls, raises KeyboardInterrupt on call number ``fail_on``."""

    def __init__(self, fail_on: int | None = None):
        self.real, self.calls, self.fail_on = secateurs.api.prune, [], fail_on

    def __call__(self, model, recipe, *args, **kwargs):
        self.calls.append(cell_key(recipe))
        if len(self.calls) == self.fail_on:
            raise KeyboardInterrupt
        return self.real(model, recipe, *args, **kwargs)


# ------------------------------------------------------------------------------------------ a finished sweep
GRID = ["--methods", "magnitude,wanda", "--sparsities", "0.5,0.7", "--patterns", "2:4", "--allocations", "uniform,owl"]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "grid"
    code, stdout, stderr = run_main(*sweep_args(tiny_model_dir, text_file, out, *GRID), "--json")
    assert code == 0, stderr
    return out, json.loads(stdout)


def test_sweep_writes_every_cell_and_the_table(finished):
    out, summary = finished
    keys = {p.stem for p in (out / "cells").glob("*.json")}
    assert keys == {"dense"} | {
        f"{m}-{t}-{a}" for m in ("magnitude", "wanda") for t in ("0.5", "0.7", "2of4") for a in ("uniform", "owl")
    }
    assert_clean(out)
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["key"] == "dense" and len(rows) == 13
    assert [r["key"] for r in rows[1:]] == [r["key"] for r in summary["rows"]]
    ratios = summary["dense"]["outlier_ratios"]
    assert len(ratios) == 3 and all(0 <= r < 1 for r in ratios)
    # exactly one best cell per target, and it has the lowest perplexity of its target
    for target in ("0.5", "0.7", "2:4"):
        group = [r for r in summary["rows"] if r["target"] == target]
        (best,) = [r for r in group if r["best"]]
        assert best["perplexity"] == min(r["perplexity"] for r in group)
    assert set(summary["essential_sparsity"]) == {"magnitude", "magnitude + owl", "wanda", "wanda + owl"}


def test_sweep_cells_match_individual_prune_runs(finished, tiny_model_dir, text_file):
    """A cell (pruned after restoring the dense weights of earlier cells) equals a prune of a freshly loaded model."""
    out, summary = finished
    dense = json.loads((out / "cells" / "dense.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    calibration = Calibration(str(text_file), 4, 32, 0)
    for key, recipe in [
        ("wanda-0.7-owl", Recipe(method="wanda", sparsity=0.7, allocation="owl")),
        ("magnitude-2of4-uniform", Recipe(method="magnitude", pattern="2:4")),
    ]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        before = secateurs.api.evaluate(model, tokenizer, str(text_file), seqlen=32, max_windows=3, progress=False)
        assert before.perplexity == pytest.approx(dense["perplexity"]["perplexity"], rel=1e-6)
        report = secateurs.api.prune(model, recipe, calibration, tokenizer=tokenizer, device="cpu", progress=False)
        after = secateurs.api.evaluate(model, tokenizer, str(text_file), seqlen=32, max_windows=3, progress=False)
        cell = json.loads((out / "cells" / f"{key}.json").read_text())
        assert cell["recipe"] == recipe.to_dict()
        assert cell["perplexity"]["perplexity"] == pytest.approx(after.perplexity, rel=1e-6)
        assert cell["report"]["sparsity"] == report.sparsity
        for mine, theirs in zip(cell["report"]["layers"], report.to_dict()["layers"], strict=True):
            assert mine["sparsity_target"] == pytest.approx(theirs["sparsity_target"])
            assert [lin["zeros"] for lin in mine["linears"]] == [lin["zeros"] for lin in theirs["linears"]]
            if theirs["output_error"] is not None:
                assert mine["output_error"] == pytest.approx(theirs["output_error"], rel=1e-5)
        row = next(r for r in summary["rows"] if r["key"] == key)
        assert row["perplexity"] == cell["perplexity"]["perplexity"]
        assert row["sparsity"] == report.sparsity


def test_sweep_page_has_its_sections(finished):
    out, _ = finished
    page = (out / "report.html").read_text()
    for needle in ('id="perplexity"', 'id="results"', 'id="fig-perplexity"', 'id="fig-alloc"', 'id="fig-error"'):
        assert needle in page
    assert page.count('<img src="data:image/png;base64,') == 3
    assert page.count('<tr class="best') == 3  # one per target
    assert "essential sparsity" in page and "Protocol" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_finished_sweep_does_no_work(finished, tiny_model_dir, text_file, monkeypatch):
    out, _ = finished
    counting = CountingPrune()
    monkeypatch.setattr(secateurs.sweep.run, "prune", counting)
    before = {p.name: p.read_bytes() for p in (out / "cells").iterdir()}
    code, _, stderr = run_main(*sweep_args(tiny_model_dir, text_file, out, *GRID))
    assert code == 0, stderr
    assert counting.calls == []
    assert {p.name: p.read_bytes() for p in (out / "cells").iterdir()} == before


# ------------------------------------------------------------------------------------------ resuming
SMALL = ["--methods", "wanda", "--sparsities", "0.5,0.7", "--patterns", "2:4"]


def test_sweep_resumes_after_an_interruption(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """Ctrl-C in the second cell: the first cell is kept and not recomputed, nothing partial or corrupt is left."""
    out = tmp_path / "sweep"
    interrupted = CountingPrune(fail_on=2)
    monkeypatch.setattr(secateurs.sweep.run, "prune", interrupted)
    code, stdout, stderr = run_main(*sweep_args(tiny_model_dir, text_file, out, *SMALL))
    assert code == 130 and stdout == ""  # as a shell reports SIGINT
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("secateurs: interrupted;") and "run the same command again to resume" in last
    assert interrupted.calls == ["wanda-0.5-uniform", "wanda-0.7-uniform"]
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["dense.json", "wanda-0.5-uniform.json"]
    assert_clean(out)
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["key"] for r in rows] == ["dense", "wanda-0.5-uniform"]
    assert {r["sweep_complete"] for r in rows} == {"false"}  # the partial table says so, row by row
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and partial["cells"]["planned"] == 4 and partial["cells"]["done"] == 2
    assert partial["cells"]["missing"] == ["wanda-0.7-uniform", "wanda-2of4-uniform"]
    page = (out / "report.html").read_text()
    assert 'id="incomplete"' in page and "Incomplete: 2 of 4 cells finished" in page
    first = (out / "cells" / "wanda-0.5-uniform.json").read_bytes()

    # a run killed while writing (a stale temporary file) and a damaged cell file are both survived
    (out / "cells" / ".wanda-0.7-uniform.json.tmp-0123abcd").write_text('{"key": "wanda-0.7-un')
    (out / "cells" / "wanda-2of4-uniform.json").write_text('{"key": "wanda-2of4-uniform", "rec')

    resumed = CountingPrune()
    monkeypatch.setattr(secateurs.sweep.run, "prune", resumed)
    code, _, stderr = run_main(*sweep_args(tiny_model_dir, text_file, out, *SMALL))
    assert code == 0, stderr
    assert resumed.calls == ["wanda-0.7-uniform", "wanda-2of4-uniform"]  # not the finished first cell
    assert (out / "cells" / "wanda-0.5-uniform.json").read_bytes() == first
    assert_clean(out)
    summary = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in summary["rows"]] == ["wanda-0.5-uniform", "wanda-0.7-uniform", "wanda-2of4-uniform"]
    assert all(math.isfinite(r["perplexity"]) for r in summary["rows"])
    assert summary["complete"] is True and summary["cells"] == {"planned": 4, "done": 4, "missing": []}
    assert 'id="incomplete"' not in (out / "report.html").read_text()


def test_sweep_refuses_other_settings_unless_fresh(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "sweep"
    grid = ["--methods", "magnitude", "--sparsities", "0.5"]
    assert run_main(*sweep_args(tiny_model_dir, text_file, out, *grid))[0] == 0
    args = sweep_args(tiny_model_dir, text_file, out, *grid)
    changed = [a if a != "4" else "5" for a in args]  # --nsamples 4 -> 5
    code, stdout, stderr = run_main(*changed)
    assert code == 2 and stdout == ""
    (error,) = [line for line in stderr.splitlines() if line.startswith("secateurs: error:")]
    assert "other settings" in error and "calibration.nsamples: 4 -> 5" in error and "--fresh" in error
    # growing the grid under the same settings is fine: only the new cell is computed
    code, _, stderr = run_main(*args, "--sparsities", "0.5,0.6")
    assert code == 0, stderr
    assert {p.stem for p in (out / "cells").glob("*.json")} == {
        "dense",
        "magnitude-0.5-uniform",
        "magnitude-0.6-uniform",
    }
    code, _, stderr = run_main(*changed, "--fresh")
    assert code == 0, stderr
    assert {p.stem for p in (out / "cells").glob("*.json")} == {"dense", "magnitude-0.5-uniform"}
    assert json.loads((out / "sweep.json").read_text())["settings"]["calibration"]["nsamples"] == 5


def test_sweep_bad_input_fails_before_any_work(tiny_model_dir, text_file, tmp_path):
    stranger = tmp_path / "not-a-sweep"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    for extra, message in [
        (["--methods", "pruney"], "unknown method"),
        (["--sparsities", "1.5"], "sparsity"),
        (["--patterns", "5:4"], "N:M"),
        (["--allocations", "missing.json"], "allocation file not found"),
        (["--eval", "none"], "evaluation text"),
    ]:
        out = tmp_path / f"out-{len(message)}"
        code, stdout, stderr = run_main(*sweep_args(tiny_model_dir, text_file, out, *extra))
        assert code == 2 and stdout == "", stderr
        assert message in stderr, stderr
        assert not out.exists()
    code, _, stderr = run_main(*sweep_args(tiny_model_dir, text_file, stranger, "--methods", "magnitude"))
    assert code == 2 and "holds no sweep" in stderr
    assert [p.name for p in stranger.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------------ pure parts
def test_essential_sparsity_on_hand_made_numbers():
    # dense 10, limit 12: crossed between 0.5 (11) and 0.6 (14.4), interpolated in log-perplexity
    knee = essential_sparsity([(0.6, 14.4), (0.5, 11.0), (0.7, 90.0)], dense=10.0, tolerance=0.2)
    t = (math.log(12) - math.log(11)) / (math.log(14.4) - math.log(11))
    assert knee == Knee(pytest.approx(0.5 + 0.1 * t), pytest.approx(12.0), False)
    assert 0.5 < knee.sparsity < 0.6
    assert knee.exact and knee.label() == f"{knee.sparsity:.2f}"
    # a point exactly on the limit is still within it
    assert essential_sparsity([(0.5, 12.0), (0.7, 24.0)], 10.0, 0.2).sparsity == pytest.approx(0.5 + 0.2 * 0.0)
    # already above at the first pruned point: below the grid, not interpolated from the dense model
    knee = essential_sparsity([(0.5, 100.0), (0.7, 1000.0)], 10.0, 0.2)
    assert knee == Knee(0.5, pytest.approx(12.0), below=True) and knee.label() == "< 0.50" and not knee.exact
    # never above: the knee lies beyond the grid
    knee = essential_sparsity([(0.3, 10.5), (0.5, 11.9)], 10.0, 0.2)
    assert knee.beyond and knee.sparsity == 0.5 and knee.label() == "≥ 0.50"
    # a diverged model (inf / nan) stops the curve at the last good point
    assert essential_sparsity([(0.5, 11.0), (0.6, math.inf)], 10.0).sparsity == 0.5
    assert essential_sparsity([(0.5, 11.0), (0.6, math.nan)], 10.0).sparsity == 0.5
    assert essential_sparsity([(0.5, math.nan)], 10.0) == Knee(0.5, pytest.approx(12.0), below=True)
    # a larger tolerance moves the knee right
    assert essential_sparsity([(0.5, 11.0), (0.6, 14.4)], 10.0, 0.3).sparsity > knee.sparsity


def test_results_rows_mark_the_best_per_target():
    def cell(key, method, perplexity, sparsity=0.5, pattern=None, allocation="uniform"):
        recipe = Recipe(method=method, sparsity=sparsity, pattern=pattern, allocation=allocation).to_dict()
        layers = [{"index": 0, "name": "l.0", "sparsity_target": sparsity, "output_error": 0.1, "linears": []}]
        report = {"sparsity": sparsity, "prune_seconds": 1.0, "layers": layers}
        return {"key": key, "recipe": recipe, "report": report, "perplexity": {"perplexity": perplexity}}

    results = Results(
        kind="sweep",
        model="m",
        dense_perplexity={"perplexity": 10.0},
        cells=[
            cell("a", "wanda", 30.0),
            cell("b", "magnitude", 90.0),
            cell("c", "wanda", 12.0, 0.3),
            cell("d", "wanda", 40.0, pattern="2:4"),
            cell("e", "wanda", 20.0, allocation="owl"),
        ],
    )
    rows = results.rows()
    assert [r["key"] for r in rows] == ["c", "e", "a", "b", "d"]
    assert [r["key"] for r in rows if r["best"]] == ["c", "e", "d"]
    assert rows[1]["series"] == "wanda + owl" and rows[1]["vs_dense"] == 2.0
    assert results.curves() == {
        "wanda": [(0.3, 12.0), (0.5, 30.0)],
        "magnitude": [(0.5, 90.0)],
        "wanda + owl": [(0.5, 20.0)],
    }
    assert results.knees()["wanda"].sparsity == pytest.approx(
        0.3 + 0.2 * (math.log(12) - math.log(12)) / (math.log(30) - math.log(12))
    )


def test_grid_keys_and_duplicates():
    recipes = Grid(["wanda", "sparsegpt"], [0.5], ["2:4"], ["uniform", "owl"], [None]).recipes()
    assert [cell_key(r) for r in recipes] == [
        "wanda-0.5-uniform",
        "wanda-0.5-owl",
        "wanda-2of4-uniform",
        "wanda-2of4-owl",
        "sparsegpt-0.5-uniform",
        "sparsegpt-0.5-owl",
        "sparsegpt-2of4-uniform",
        "sparsegpt-2of4-owl",
    ]
    assert cell_key(Recipe(method="wanda", sparsity=0.6, allocation="my alloc.json")) == "wanda-0.6-file-my_alloc"
    with pytest.raises(SecateursError, match="repeats"):
        Grid(["wanda"], [0.5, 0.5]).recipes()
    with pytest.raises(SecateursError, match="empty"):
        Grid(["wanda"], [], []).recipes()
    assert settings_differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == [
        "a.c: 2 -> 3",
        "d: (none) -> 4",
    ]


def test_snapshot_restores_dense_weights(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    saved = snapshot_linears(model)
    assert saved and all(".mlp." in k or ".self_attn." in k for k in saved)
    secateurs.api.prune(model, Recipe(method="magnitude", sparsity=0.9), device="cpu", progress=False)
    assert any(not model.state_dict()[k].equal(v) for k, v in reference.items())
    restore_linears(model, saved)
    assert all(model.state_dict()[k].equal(v) for k, v in reference.items())


def test_sweep_folder_lock_and_a_start_without_cells(tiny_model_dir, text_file, tmp_path):
    import fcntl

    out = tmp_path / "sweep"
    grid = ["--methods", "magnitude", "--sparsities", "0.5"]
    # a run that stopped before any cell (e.g. the model failed to load) does not pin its settings
    (out / "cells").mkdir(parents=True)
    (out / "sweep.json").write_text(json.dumps({"format": 1, "settings": {"model": "another"}}))
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, stderr = run_main(*sweep_args(tiny_model_dir, text_file, out, *grid))
        assert code == 2 and "another sweep is writing into" in stderr
    assert not any((out / "cells").iterdir())
    code, _, stderr = run_main(*sweep_args(tiny_model_dir, text_file, out, *grid))
    assert code == 0, stderr
    assert json.loads((out / "sweep.json").read_text())["settings"]["model"] == str(Path(tiny_model_dir).resolve())


def test_sweep_refine_axis(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "sw"
    grid = ["--methods", "wanda", "--sparsities", "0.5", "--refine", "none,dsnot"]
    code, stdout, stderr = run_main(*sweep_args(tiny_model_dir, text_file, out, *grid), "--json")
    assert code == 0, stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["refine"] for r in rows if r["method"]) == ["dsnot", "none"]
    cell = json.loads((out / "cells" / "wanda-0.5-uniform-dsnot.json").read_text())
    linears = [lin for layer in cell["report"]["layers"] for lin in layer["linears"]]
    assert linears and all("dsnot" in lin["info"] for lin in linears)


def test_sweep_update_axis_and_stage_settings(tiny_model_dir, text_file, tmp_path):
    """--updates is an axis; a stage flag (--admm-iters) reaches every cell and is pinned in sweep.json."""
    out = tmp_path / "sw"
    grid = ["--methods", "wanda,ria", "--sparsities", "0.5", "--updates", "none,admm", "--admm-iters", "7"]
    code, stdout, stderr = run_main(*sweep_args(tiny_model_dir, text_file, out, *grid), "--json")
    assert code == 0, stderr
    rows = [r for r in csv.DictReader((out / "results.csv").open()) if r["method"]]
    assert sorted((r["method"], r["update"]) for r in rows) == [
        ("ria", "admm"),
        ("ria", "none"),
        ("wanda", "admm"),
        ("wanda", "none"),
    ]
    plain = json.loads((out / "cells" / "wanda-0.5-uniform.json").read_text())
    cell = json.loads((out / "cells" / "wanda-0.5-uniform-admm.json").read_text())
    assert cell["recipe"]["update"] == "admm" and cell["recipe"]["options"]["update"]["iters"] == 7
    # the update keeps Wanda's masks of the first layer (later layers see the updated layers' outputs)
    digests = [[lin["mask_sha256"] for lin in c["report"]["layers"][0]["linears"]] for c in (plain, cell)]
    assert digests[0] == digests[1]
    errors = [sum(lay["output_error"] for lay in c["report"]["layers"]) for c in (plain, cell)]
    assert errors[1] < errors[0]
    settings = json.loads((out / "sweep.json").read_text())["settings"]["recipe"]["stages"]
    assert settings["update:admm"]["iters"] == 7 and "pruner:ria" in settings
    # another ADMM setting is other settings: refused unless --fresh
    code, _, stderr = run_main(*sweep_args(tiny_model_dir, text_file, out, *grid[:-1], "8"))
    assert code == 2 and "iters: 7 -> 8" in stderr
