"""Damaged model files give one `secateurs: error:` line, never a traceback: truncated or header-corrupt
safetensors, a tiny or truncated .gguf, a pickle the weights-only loader refuses."""

from __future__ import annotations

import shutil

import pytest
from conftest import run_main


def _copy(tiny_model_dir, tmp_path, name="bad"):
    folder = tmp_path / name
    shutil.copytree(tiny_model_dir, folder)
    return folder


def _truncate(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_header(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"{" * 32  # the JSON header after its 8-byte length
    path.write_bytes(bytes(data))


def _tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF\x03\x00")
    return path


def _pickle(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95not really a pickle")


CASES = {
    "truncated safetensors": (_truncate, "cannot load the model in"),
    "corrupt safetensors header": (_corrupt_header, "cannot load the model in"),
    "refused pickle": (_pickle, "cannot load the model in"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", ["eval", "prune", "compress"])
def test_damaged_folder_is_one_error_line(tiny_model_dir, tmp_path, case, command):
    damage, message = CASES[case]
    folder = _copy(tiny_model_dir, tmp_path)
    damage(folder)
    extra = {"eval": ["--eval-windows", "1"], "prune": ["--nsamples", "2", "--seqlen", "16"], "compress": []}
    out = tmp_path / "out"
    argv = [command, folder, *extra[command], "--quiet"]
    argv += ["--output", out] if command != "eval" else []
    code, _, err = run_main(*argv)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("secateurs: error: ") and message in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_tiny_gguf_is_one_error_line(tmp_path):
    code, _, err = run_main("eval", _tiny_gguf(tmp_path), "--quiet")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "cannot load the model in" in lines[0], err
