"""Streaming a model from its shards, layer by layer, prunes it exactly as in memory and writes a normal folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TOKENIZER_VOCAB, run_main, save_tiny_model_dir
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import secateurs
from secateurs.oneshot.streaming import INDEX, Shards, StreamedOutput, open_streamed


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny LLaMA saved in several shards (and its tokenizer)."""
    folder = tmp_path_factory.mktemp("sharded") / "llama"
    save_tiny_model_dir(folder, "llama")
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(folder, max_shard_size="40KB")
    (folder / "model.safetensors").unlink(missing_ok=True)
    assert len(json.loads((folder / INDEX).read_text())["weight_map"]) > 0
    return folder


def windows():
    torch.manual_seed(5)
    return torch.randint(0, TOKENIZER_VOCAB, (3, 16))


@pytest.mark.parametrize("recipe", ["wanda", {"method": "sparsegpt", "sparsity": 0.6, "allocation": "owl"}])
def test_streamed_prune_equals_the_in_memory_one(sharded, tmp_path, recipe):
    memory = AutoModelForCausalLM.from_pretrained(sharded).eval()
    expected = secateurs.prune(memory, recipe, windows(), device="cpu", progress=False)

    model, tokenizer, shards = open_streamed(sharded)
    layers = model.model.layers
    assert all(p.device.type == "meta" for p in layers.parameters())  # nothing of the layers is read yet
    out = tmp_path / "out"
    output = StreamedOutput(model, shards, tokenizer, out)
    with output as residence:
        report = secateurs.prune(model, recipe, windows(), device="cpu", progress=False, residence=residence)
        output.save(report.masks)
        output.save_report({"recipe": report.recipe})
    assert all(p.device.type == "meta" for p in layers.parameters())  # and every layer is dropped again
    assert {n: m.digest() for n, m in report.masks.items()} == {n: m.digest() for n, m in expected.masks.items()}

    files = sorted(p.name for p in out.iterdir())
    assert [f for f in files if f.startswith("model-")] == [f"model-{i:05d}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert {"config.json", INDEX, "report.json", "masks.safetensors", "tokenizer.json"} <= set(files)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for name, tensor in memory.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = windows()[:1]
    torch.testing.assert_close(loaded(ids).logits, memory(ids).logits, rtol=0, atol=0)


def test_damaged_shards_are_refused_before_any_work(sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    index = json.loads((broken / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (broken / first).write_bytes((broken / first).read_bytes()[:100])
    with pytest.raises(secateurs.SecateursError, match=f"shard .*{first} is damaged or truncated"):
        Shards(broken)
    (broken / first).unlink()
    with pytest.raises(secateurs.SecateursError, match=f"shard .*{first} named by .* is missing"):
        Shards(broken)
    shutil.copyfile(sharded / first, broken / first)
    with safe_open(str(sharded / first), "pt") as f:
        holds = set(f.keys())
    elsewhere = next(k for k in index["weight_map"] if k not in holds)
    index["weight_map"][elsewhere] = first
    (broken / INDEX).write_text(json.dumps(index))
    with pytest.raises(secateurs.SecateursError, match=f"names tensor {elsewhere} in {first}, which does not hold it"):
        Shards(broken)


def test_a_checkpoint_with_other_tensor_names_is_refused(tmp_path):
    folder = save_tiny_model_dir(tmp_path / "m", "llama")
    model = AutoModelForCausalLM.from_pretrained(folder)
    save_file(
        {f"renamed.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors")
    )
    with pytest.raises(secateurs.SecateursError, match="the checkpoint has no tensor model.embed_tokens.weight"):
        open_streamed(folder)


COMMON = ["--method", "wanda", "--sparsity", "0.5", "--nsamples", "3", "--seqlen", "32", "--eval", "none"]
EVAL = ["--eval-windows", "4"]
COMMON += ["--device", "cpu", "--quiet"]


def test_cli_low_memory_writes_what_the_in_memory_prune_saves(sharded, text_file, tmp_path):
    from secateurs import cli

    streamed, memory = tmp_path / "streamed", tmp_path / "memory"
    args = ["prune", str(sharded), *COMMON, "--calibration", str(text_file), "--eval", str(text_file), *EVAL]
    assert cli.main([*args, "--output", str(streamed), "--low-memory"]) == 0
    assert cli.main([*args, "--output", str(memory)]) == 0
    a = AutoModelForCausalLM.from_pretrained(streamed).state_dict()
    b = AutoModelForCausalLM.from_pretrained(memory).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reports = [json.loads((d / "report.json").read_text()) for d in (streamed, memory)]
    assert reports[0]["streamed"] is True and reports[0]["sparsity"] == pytest.approx(0.5)
    assert reports[0]["perplexity"] == reports[1]["perplexity"]  # dense and pruned, streamed from disk
    assert reports[0]["perplexity"]["pruned"]["windows"] == 4

    code, stdout, stderr = run_main(
        "eval", str(streamed), "--low-memory", "--eval", str(text_file), *EVAL, "--seqlen", "32", "--json"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["perplexity"] == reports[1]["perplexity"]["pruned"]["perplexity"]


def test_cli_low_memory_resumes_after_sigkill(sharded, text_file, tmp_path):
    import os
    import subprocess
    import sys

    from test_resume import KILLED  # the command line, killed by SIGKILL once layer 1 is saved

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    args = ["prune", str(sharded), *COMMON, "--calibration", str(text_file), "--low-memory", "--output", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILLED, *args], env=env, capture_output=True)
    assert killed.returncode == -9
    assert not out.exists() and (tmp_path / "out.resume").is_dir()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]  # the killed run's, removed later
    done = subprocess.run([sys.executable, "-m", "secateurs", *args, "--resume"], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # progress and the dead run's partial folder gone

    from secateurs import cli

    whole = tmp_path / "whole"
    assert cli.main(["prune", str(sharded), *COMMON, "--calibration", str(text_file), "--output", str(whole)]) == 0
    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(whole).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model-is-hub"], "--low-memory streams a local Hugging Face folder"),
    ],
)
def test_cli_low_memory_refusals(extra, message, sharded, text_file, tmp_path):
    model = "someone/some-model" if extra == ["--model-is-hub"] else str(sharded)
    extra = [] if extra == ["--model-is-hub"] else extra
    code, stdout, stderr = run_main(
        "prune",
        model,
        *COMMON,
        "--calibration",
        str(text_file),
        "--low-memory",
        "--output",
        str(tmp_path / "o"),
        *extra,
    )
    assert code == 2 and message in stderr and not (tmp_path / "o").exists()


def test_streamed_perplexity_equals_the_in_memory_one(sharded, text_file):
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sharded).eval()
    tokenizer = AutoTokenizer.from_pretrained(sharded)
    expected = secateurs.evaluate(model, tokenizer, str(text_file), seqlen=32, max_windows=5, progress=False)
    got = secateurs.evaluate_streamed(sharded, str(text_file), seqlen=32, max_windows=5, device="cpu", progress=False)
    assert got.to_dict() == expected.to_dict()
    assert got.windows == 5 and got.bos


@pytest.mark.parametrize("low_memory", [True, False])
def test_no_room_for_the_output_is_refused_before_the_walk(low_memory, sharded, text_file, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    out = tmp_path / "o"
    flags = ["--low-memory"] if low_memory else []
    code, _, stderr = run_main(
        "prune", str(sharded), *COMMON, "--calibration", str(text_file), "--output", str(out), *flags
    )
    assert code == 2 and "secateurs: error: not enough disk for the pruned model: about" in stderr
    assert "GB free in" in stderr and sorted(p.name for p in tmp_path.iterdir()) == []


def test_torchrun_low_memory_writes_the_single_process_output(sharded, text_file, tmp_path):
    """Two gloo processes streaming the same shards: rank 0 writes what one process writes."""
    from test_distributed import torchrun

    from secateurs import cli

    args = [*COMMON, "--calibration", str(text_file), "--low-memory"]
    done = torchrun("-m", "secateurs", "prune", sharded, *args, "--output", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli.main(["prune", str(sharded), *args, "--output", str(tmp_path / "one")]) == 0
    for name in sorted(p.name for p in (tmp_path / "one").glob("model-*.safetensors")):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def test_a_dtype_given_by_name_is_streamed_in_that_dtype(sharded, tmp_path):
    model, tokenizer, shards = open_streamed(sharded, "bfloat16")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    with StreamedOutput(model, shards, tokenizer, tmp_path / "out") as residence:
        secateurs.prune(model, "wanda", windows(), device="cpu", progress=False, residence=residence)
        assert residence.layers[0].self_attn.q_proj.weight.device.type == "meta"
