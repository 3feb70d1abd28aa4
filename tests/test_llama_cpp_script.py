"""benchmarks/llama_cpp.py: runs llama.cpp's llama-bench when it is there (a stand-in here), skips plainly when not."""

from __future__ import annotations

import importlib.util
import json
import stat
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llama_cpp.py"


def load_script():
    spec = importlib.util.spec_from_file_location("llama_cpp_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_skips_with_a_clear_message_without_llama_bench(tmp_path, capsys, monkeypatch):
    script = load_script()
    monkeypatch.delenv("LLAMA_BENCH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert script.main(["--gguf", "Q8_0=model.gguf", "--json", str(tmp_path / "r.json")]) == 0
    assert script.NOT_INSTALLED in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text()) == {"rows": [], "llama_bench": None}


def test_reads_llama_bench_json(tmp_path, capsys):
    """A stand-in llama-bench that records its arguments and prints llama-bench's JSON: the script passes the
    threads, prompt, tokens and repeats through and reads prompt and generation speeds apart."""
    fake = tmp_path / "llama-bench"
    entries = [
        {"n_prompt": 64, "n_gen": 0, "avg_ts": 674.0, "model_type": "llama ?B Q8_0", "cpu_info": "AMD EPYC"},
        {"n_prompt": 0, "n_gen": 32, "avg_ts": 94.7, "model_type": "llama ?B Q8_0", "cpu_info": "AMD EPYC"},
    ]
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\ncat <<'JSON'\n{json.dumps(entries)}\nJSON\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    script = load_script()
    out = tmp_path / "r.json"
    argv = ["--gguf", "Q8_0=m.gguf", "--llama-bench", str(fake), "--threads", "3", "--prompt", "16"]
    assert script.main([*argv, "--tokens", "8", "--repeat", "2", "--json", str(out)]) == 0
    assert (tmp_path / "args").read_text().split() == [
        "-m", "m.gguf", "-t", "3", "-p", "16", "-n", "8", "-r", "2", "-o", "json"
    ]  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    assert row["decode_tokens_per_s"] == 94.7 and row["prefill_tokens_per_s"] == 674.0
    assert row["engine"] == "llama.cpp" and row["model"] == "Q8_0"
    assert "llama.cpp" in capsys.readouterr().out


def test_our_head_follows_the_stored_values(tmp_path):
    """auto: int8 rows for a folder whose packed linears hold int8 codes, the kernel as stored otherwise; an
    explicit choice wins."""
    import torch
    from safetensors.torch import save_file

    script = load_script()
    int8_dir, float_dir = tmp_path / "i8", tmp_path / "f32"
    int8_dir.mkdir()
    float_dir.mkdir()
    codes = {"a.values": torch.ones(3, dtype=torch.int8), "a.scales": torch.ones(1)}
    save_file(codes, int8_dir / "model.sparse.safetensors")
    save_file({"a.values": torch.ones(3)}, float_dir / "model.sparse.safetensors")
    assert script.our_head("auto", int8_dir) == "int8"
    assert script.our_head("auto", float_dir) == "kernel"
    assert script.our_head("torch", int8_dir) == "torch"
