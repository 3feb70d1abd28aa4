"""Bad input, one table: every row is a command on a tiny model or a file made here, and it must give exit 2,
exactly one ``secateurs: error:`` line, no traceback, nothing on stdout, an output folder that is absent or
untouched, and, for a check that needs no calibration pass, no forward pass of the model at all."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers
from conftest import run_main

FAST = ["--nsamples", "2", "--seqlen", "16", "--eval-windows", "1", "--quiet"]


@pytest.fixture
def forwards(monkeypatch):
    """Counts forward passes of the tiny LLaMA's decoder (every prune, eval and capture runs one)."""
    calls = []
    model_class = transformers.models.llama.modeling_llama.LlamaModel
    original = model_class.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(model_class, "forward", counted)
    return calls


def _files(tmp_path, tiny_model_dir, text_file):
    """The inputs the rows refer to, by name."""
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "kept").mkdir()
    (folder / "kept" / "mine.txt").write_text("precious")  # a folder secateurs did not write
    (folder / "a_file").write_text("not a folder")
    (folder / "short.txt").write_text("too short")
    (folder / "table.json").write_text(json.dumps({"model.layers.0": 0.5, "model.layers.9": 0.5}))
    (folder / "recipe.json").write_text(json.dumps({"method": "wanda", "no_such_field": 1}))
    (folder / "train.json").write_text(json.dumps({"method": "rigl", "epoch": 3}))
    damaged = folder / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    data = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "tiny.gguf").write_bytes(b"GGUF\x03\x00")
    report = folder / "report"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"layers": "not a list", "recipe": ["wanda"]}))
    return {
        "model": str(tiny_model_dir),
        "text": str(text_file),
        "kept": str(folder / "kept"),
        "a_file": str(folder / "a_file"),
        "short": str(folder / "short.txt"),
        "table": str(folder / "table.json"),
        "recipe": str(folder / "recipe.json"),
        "train": str(folder / "train.json"),
        "damaged": str(damaged),
        "gguf": str(folder / "tiny.gguf"),
        "report": str(report),
        "missing": str(folder / "missing"),
    }


OUT = "{out}"
PRUNE = ["prune", "{model}", "--calibration", "{text}", "--eval", "{text}", *FAST]
# (argv, a phrase of the error line, whether no forward pass may run, the folder that must stay as it was)
ROWS = {
    "unknown model path": (["eval", "{missing}", "--quiet"], "neither a model folder nor a .gguf file", True, None),
    "sparsity out of range": ([*PRUNE, "--sparsity", "1.5", "--output", OUT], "sparsity", True, None),
    "malformed pattern": ([*PRUNE, "--pattern", "5:4", "--output", OUT], "N:M", True, None),
    "pattern that does not divide": ([*PRUNE, "--pattern", "3:7", "--output", OUT], "divisible", True, None),
    "allocation table of other layers": (
        [*PRUNE, "--allocation", "{table}", "--output", OUT],
        "model.layers.9",
        True,
        None,
    ),
    "exclude matching every linear": ([*PRUNE, "--exclude", "*", "--output", OUT], "every", True, None),
    "text too short": (
        ["prune", "{model}", "--calibration", "{short}", "--eval", "none", *FAST, "--output", OUT],
        "too short",
        False,
        None,
    ),
    "unreadable calibration file": ([*PRUNE[:3], "{missing}", *PRUNE[4:], "--output", OUT], "missing", True, None),
    "unknown recipe field": ([*PRUNE, "--recipe", "{recipe}", "--output", OUT], "no_such_field", True, None),
    "output is a file": ([*PRUNE, "--output", "{a_file}"], "not a folder", True, "a_file"),
    "overwrite of a folder secateurs did not write": (
        [*PRUNE, "--output", "{kept}", "--overwrite"],
        "only replaces a folder that secateurs wrote",
        True,
        "kept",
    ),
    "damaged safetensors (prune)": ([*PRUNE[:1], "{damaged}", *PRUNE[2:], "--output", OUT], "damaged", True, None),
    "damaged safetensors (compress)": (["compress", "{damaged}", "--output", OUT, "--quiet"], "damaged", True, None),
    "tiny gguf": (["eval", "{gguf}", "--quiet"], "cannot load the model in", True, None),
    "report.json of the wrong types": (["report", "{report}", "--quiet"], "report.json", True, None),
    "compress of a missing folder": (["compress", "{missing}", "--output", OUT, "--quiet"], "missing", True, None),
    "bench of a missing folder": (["bench", "{missing}", "--quiet"], "missing", True, None),
    "finetune of an unpruned model": (
        ["finetune", "{model}", "--data", "{text}", "--steps", "1", "--output", OUT, "--quiet"],
        "not a secateurs prune output",
        True,
        None,
    ),
    "train with an unknown method": (["train", "--method", "bogus", "--quiet"], "unknown training method", True, None),
    "train recipe with an unknown field": (["train", "{train}", "--quiet"], "unknown recipe field", True, None),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input(row, tmp_path, tiny_model_dir, text_file, forwards):
    argv, phrase, before_any_forward, untouched = ROWS[row]
    files = _files(tmp_path, tiny_model_dir, text_file)
    out = tmp_path / "out"
    argv = [a.format(**files, out=out) for a in argv]
    snapshot = None
    if untouched:
        path = tmp_path / "files" / untouched
        snapshot = sorted(p.name for p in path.iterdir()) if path.is_dir() else path.read_text()
    code, stdout, stderr = run_main(*argv)
    errors = [line for line in stderr.splitlines() if line.startswith("secateurs: error:")]
    assert code == 2, (code, stderr)
    assert len(errors) == 1 and phrase in errors[0], stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    if untouched:
        path = tmp_path / "files" / untouched
        assert (sorted(p.name for p in path.iterdir()) if path.is_dir() else path.read_text()) == snapshot
    if before_any_forward:
        assert forwards == [], f"{len(forwards)} forward pass(es) before the error"


def test_the_forward_counter_sees_a_forward_pass(tiny_model_dir, text_file, forwards):
    """The table's "no forward pass" would pass vacuously if the counter saw nothing: a valid run is counted."""
    code, _, stderr = run_main("eval", tiny_model_dir, "--eval", text_file, "--seqlen", "16", *FAST[4:])
    assert code == 0, stderr
    assert forwards, "the counter missed the evaluation's forward passes"
