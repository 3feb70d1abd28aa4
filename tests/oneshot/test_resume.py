"""A stopped pruning run continues from its last finished layer, with the result of an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model
from safetensors import safe_open

import secateurs
from secateurs.oneshot.resume import STATE, RunState, layer_file

TESTS = Path(__file__).resolve().parents[1]
RECIPE = {"method": "sparsegpt", "sparsity": 0.6, "allocation": "owl", "refine": "dsnot"}


class Stop(Exception):
    pass


def windows() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randint(0, VOCAB, (4, 16))


def state_of(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def stop_after(monkeypatch, layers: int) -> None:
    """Make the run stop (as a Ctrl-C or a crash would) right after ``layers`` layers are saved."""
    real = RunState.save_layer

    def save_then_stop(self, index, *args, **kwargs):
        real(self, index, *args, **kwargs)
        if index + 1 == layers:
            raise Stop

    monkeypatch.setattr(RunState, "save_layer", save_then_stop)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    whole = tiny_model("llama")
    expected = secateurs.prune(whole, RECIPE, windows(), device="cpu", progress=False)
    folder = tmp_path / "run"
    with monkeypatch.context() as patch:
        stop_after(patch, 2)  # of 3 layers
        with pytest.raises(Stop):
            secateurs.prune(tiny_model("llama"), RECIPE, windows(), device="cpu", progress=False, checkpoint=folder)
    state = json.loads((folder / STATE).read_text())
    assert state["layers_done"] == 2 and state["allocation"]["measures"]  # OWL's dense pass is not run again
    assert sorted(p.name for p in folder.iterdir()) == [layer_file(0), layer_file(1), STATE]

    model = tiny_model("llama")
    report = secateurs.prune(model, RECIPE, windows(), device="cpu", progress=False, checkpoint=folder, resume=True)
    for name, tensor in state_of(whole).items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert {n: m.digest() for n, m in report.masks.items()} == {n: m.digest() for n, m in expected.masks.items()}
    for got, want in zip(report.layers, expected.layers, strict=True):
        assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}
    assert json.loads((folder / STATE).read_text())["layers_done"] == 3


def test_a_stopped_run_is_not_overwritten_and_another_run_is_not_resumed(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    again = dict(device="cpu", progress=False, checkpoint=folder, resume=True)
    with monkeypatch.context() as patch:
        stop_after(patch, 1)
        with pytest.raises(Stop):
            secateurs.prune(tiny_model("llama"), RECIPE, windows(), device="cpu", progress=False, checkpoint=folder)
    with pytest.raises(secateurs.SecateursError, match=r"holds a stopped run \(1 layer done\): --resume"):
        secateurs.prune(tiny_model("llama"), RECIPE, windows(), device="cpu", progress=False, checkpoint=folder)
    other = {**RECIPE, "sparsity": 0.5}
    with pytest.raises(secateurs.SecateursError, match=r"another recipe \(sparsity: 0.6 then, 0.5 now\)"):
        secateurs.prune(tiny_model("llama"), other, windows(), **again)
    with pytest.raises(secateurs.SecateursError, match="another model"):
        secateurs.prune(tiny_model("llama", seed=1), RECIPE, windows(), **again)
    with pytest.raises(secateurs.SecateursError, match="another calibration window"):
        secateurs.prune(tiny_model("llama"), RECIPE, windows()[:3], **again)
    (folder / layer_file(0)).write_bytes(b"\x00" * 10)
    with pytest.raises(secateurs.SecateursError, match=f"{layer_file(0)} is damaged"):
        secateurs.prune(tiny_model("llama"), RECIPE, windows(), **again)


def test_magnitude_runs_resume_without_calibration(tmp_path, monkeypatch):
    whole = tiny_model("gpt2")  # Conv1D weights, stored transposed
    secateurs.prune(whole, "magnitude", None, progress=False)
    folder = tmp_path / "run"
    with monkeypatch.context() as patch:
        stop_after(patch, 1)
        with pytest.raises(Stop):
            secateurs.prune(tiny_model("gpt2"), "magnitude", None, progress=False, checkpoint=folder)
    model = tiny_model("gpt2")
    secateurs.prune(model, "magnitude", None, progress=False, checkpoint=folder, resume=True)
    for name, tensor in state_of(whole).items():
        assert torch.equal(model.state_dict()[name], tensor), name


# run by the SIGKILL test: the CLI, killed by SIGKILL as soon as layer 1 of 3 is on disk
KILLED = textwrap.dedent(
    """
    import os, signal, sys
    from secateurs.cli import main
    from secateurs.oneshot.resume import RunState

    real = RunState.save_layer
    def save_then_die(self, index, *args, **kwargs):
        real(self, index, *args, **kwargs)
        if index == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    RunState.save_layer = save_then_die
    sys.exit(main(sys.argv[1:]))
    """
)


def test_cli_resume_after_sigkill_writes_identical_files(tiny_model_dir, text_file, tmp_path):
    args = [str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--calibration", str(text_file)]
    args += ["--nsamples", "3", "--seqlen", "32", "--eval", "none", "--device", "cpu", "--quiet"]
    args += ["--save-format", "sparse"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    done = subprocess.run([sys.executable, "-m", "secateurs", "prune", *args, "--output", str(whole)], env=env)
    assert done.returncode == 0
    killed = subprocess.run(
        [sys.executable, "-c", KILLED, "prune", *args, "--output", str(resumed)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-2000:].decode()
    progress = tmp_path / "resumed.resume"
    assert not resumed.exists() and json.loads((progress / STATE).read_text())["layers_done"] == 2

    again = subprocess.run(
        [sys.executable, "-m", "secateurs", "prune", *args, "--output", str(resumed)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "holds a stopped run (2 layers done): --resume" in again.stderr
    done = subprocess.run(
        [sys.executable, "-m", "secateurs", "prune", *args, "--output", str(resumed), "--resume"], env=env
    )
    assert done.returncode == 0
    assert not progress.exists()  # the run's state goes once the model is saved
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            assert content_digest(resumed / name) == content_digest(whole / name), name
        elif name != "report.json":  # timings differ
            assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
    reports = [json.loads((d / "report.json").read_text()) for d in (whole, resumed)]
    digests = [[lin["mask_sha256"] for layer in r["layers"] for lin in layer["linears"]] for r in reports]
    assert digests[0] == digests[1] and len(digests[0]) == 21


def content_digest(path: Path) -> str:
    """A hash of a safetensors file's tensors (bytes, dtype, shape) and metadata. Not of the file's bytes: the
    safetensors writer lays the metadata out in an order that changes from one process to the next."""
    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        h.update(json.dumps(f.metadata(), sort_keys=True).encode())
        for key in sorted(f.keys()):
            t = f.get_tensor(key)
            h.update(f"{key}{t.dtype}{tuple(t.shape)}".encode() + t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
