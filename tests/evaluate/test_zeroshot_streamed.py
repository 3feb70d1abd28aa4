"""Zero-shot accuracy of a streamed model (one decoder layer at a time): the requests, log-likelihoods and metrics
of lm-eval's HFLM on the same model in memory, chunked or not; refusals before any model work; the command line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import run_main, save_tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from secateurs.errors import SecateursError
from secateurs.evaluate.zeroshot import zero_shot
from secateurs.oneshot import streamed_zeroshot
from secateurs.oneshot.streamed_zeroshot import zero_shot_streamed
from secateurs.oneshot.streaming import INDEX, Streamed

TASK = "bible_next_2_far"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval")


def sharded_dir(folder: Path, family: str, bos: bool, positions: int | None = None) -> Path:
    """A tiny random ``family`` model saved in several shards, its tokenizer beside it."""
    save_tiny_model_dir(folder, family, bos=bos, seed=3)
    if positions is not None:  # rotary: the weights do not depend on it
        config = json.loads((folder / "config.json").read_text())
        config["max_position_embeddings"] = positions
        (folder / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(folder, max_shard_size="100KB")
    (folder / "model.safetensors").unlink(missing_ok=True)
    assert len(set(json.loads((folder / INDEX).read_text())["weight_map"].values())) > 2
    return folder


@pytest.fixture(scope="module")
def llama_shards(tmp_path_factory):
    """LLaMA with BOS and 1024 positions (a bundled passage and its choices fit)."""
    return sharded_dir(tmp_path_factory.mktemp("zs-stream") / "llama", "llama", bos=True, positions=1024)


@pytest.fixture(scope="module")
def gpt2_shards(tmp_path_factory):
    """GPT-2 (Conv1D, learned positions) without BOS and 128 positions: lm-eval cuts the contexts on the left."""
    return sharded_dir(tmp_path_factory.mktemp("zs-stream") / "gpt2", "gpt2", bos=False)


def in_memory(folder: Path, tasks: str, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return zero_shot(model, AutoTokenizer.from_pretrained(folder), tasks, progress=False, log_samples=True, **kwargs)


def chunks_run(monkeypatch) -> list[int]:
    """Counts the passes over the layers (each starts by entering layer 0)."""
    passes = []
    enter = Streamed.enter

    def counting(self, index, layer, device):
        if index == 0:
            passes.append(index)
        return enter(self, index, layer, device)

    monkeypatch.setattr(Streamed, "enter", counting)
    return passes


def assert_same_scores(streamed, memory, name: str):
    """Every request's (log-likelihood, is_greedy) to 1e-4, the metrics and the result's keys identical."""
    got, expected = streamed.tasks[name], memory.tasks[name]
    assert len(got.samples) == len(expected.samples) > 0
    for a, b in zip(got.samples, expected.samples, strict=True):
        assert a["doc_id"] == b["doc_id"] and a["target"] == b["target"]
        assert [r[0] for r in a["responses"]] == pytest.approx([r[0] for r in b["responses"]], abs=1e-4)
        assert [r[1] for r in a["responses"]] == [r[1] for r in b["responses"]]
    assert got.metrics == expected.metrics and got.stderr == expected.stderr
    assert (got.examples, got.available, got.num_fewshot) == (
        expected.examples,
        expected.available,
        expected.num_fewshot,
    )
    a, b = streamed.to_dict(), memory.to_dict()
    assert a.keys() == b.keys() and a["tasks"][name].keys() == b["tasks"][name].keys()
    assert (a["max_length"], a["limit"], a["batch_size"]) == (b["max_length"], b["limit"], b["batch_size"])
    assert streamed.streamed and not memory.streamed
    assert a["protocol"] == b["protocol"] + "; model streamed one decoder layer at a time"


# ------------------------------------------------------------------------------------------------ correctness
def test_streamed_llama_scores_what_hflm_scores_in_memory(llama_shards, monkeypatch):
    """Chunks of one batch each (a budget of 200 kB of hidden states): the layers are read once per chunk."""
    memory = in_memory(llama_shards, TASK, limit=12, batch_size=5)
    passes = chunks_run(monkeypatch)
    streamed = zero_shot_streamed(
        llama_shards, TASK, limit=12, batch_size=5, device="cpu", progress=False, log_samples=True, hidden_bytes=200_000
    )
    assert_same_scores(streamed, memory, TASK)
    assert len(passes) == 5  # 24 requests (12 two-choice examples) in batches of 5, a chunk each
    assert streamed.device == "cpu"


def test_streamed_gpt2_cut_contexts_few_shot_one_chunk(gpt2_shards, monkeypatch):
    """No BOS (lm-eval's prefix token), contexts cut on the left to 128 positions, one few-shot example; the default
    budget holds every request: the layers are read once."""
    memory = in_memory(gpt2_shards, TASK, limit=6, batch_size=4, num_fewshot=1)
    passes = chunks_run(monkeypatch)
    streamed = zero_shot_streamed(
        gpt2_shards, TASK, limit=6, batch_size=4, num_fewshot=1, device="cpu", progress=False, log_samples=True
    )
    assert_same_scores(streamed, memory, TASK)
    assert len(passes) == 1 and streamed.max_length == 128


def test_a_batch_lm_eval_did_not_plan_is_an_error(llama_shards, monkeypatch):
    """Should lm-eval batch its requests otherwise than planned, the run stops: no figure from other tokens."""
    lm_class = streamed_zeroshot.streamed_lm_class()
    planned = lm_class._batches
    monkeypatch.setattr(lm_class, "_batches", lambda self, requests: planned(self, requests)[::-1])
    with pytest.raises(SecateursError, match="other tokens than planned"):
        zero_shot_streamed(llama_shards, TASK, limit=4, batch_size=2, device="cpu", progress=False)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.fixture
def generation_task(tmp_path) -> Path:
    (tmp_path / "gen.jsonl").write_text(json.dumps({"question": "Say yes:", "answer": "yes"}) + "\n")
    yaml = tmp_path / "gen.yaml"
    yaml.write_text(
        "task: gen_task\ncustom_dataset: !function secateurs.evaluate.tasks.load_dataset\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gen.jsonl'}\n"
        'output_type: generate_until\ntest_split: test\ndoc_to_text: "{{question}}"\ndoc_to_target: answer\n'
        "generation_kwargs:\n  until: ['\\n']\nmetric_list:\n  - metric: exact_match\n"
    )
    return yaml


def test_tasks_a_streamed_model_cannot_score_are_refused_before_reading_it(generation_task, monkeypatch):
    monkeypatch.setattr("secateurs.oneshot.streaming.open_streamed", lambda *a, **k: pytest.fail("read the model"))
    with pytest.raises(SecateursError, match=r"not gen_task \(generate_until\)"):
        zero_shot_streamed("nowhere", [TASK, str(generation_task)], progress=False)
    with pytest.raises(SecateursError, match="fixed batch size"):
        zero_shot_streamed("nowhere", TASK, batch_size="auto", progress=False)
    with pytest.raises(SecateursError, match="hidden_bytes"):
        zero_shot_streamed("nowhere", TASK, hidden_bytes=0, progress=False)
    lm_class = streamed_zeroshot.streamed_lm_class()
    for method in (lm_class.loglikelihood_rolling, lm_class.generate_until):
        with pytest.raises(SecateursError, match="log-likelihood and multiple-choice tasks only"):
            method(None, [])


# ------------------------------------------------------------------------------------------------ command line
def test_cli_eval_low_memory_tasks_equal_the_in_memory_eval(llama_shards):
    args = ["eval", llama_shards, "--eval", "none", "--tasks", TASK, "--limit", "4", "--batch-size", "3"]
    code, stdout, stderr = run_main(*args, "--low-memory", "--device", "cpu", "--quiet", "--json")
    assert code == 0, stderr
    streamed = json.loads(stdout)
    code, stdout, stderr = run_main(*args, "--quiet", "--json")
    assert code == 0, stderr
    memory = json.loads(stdout)
    assert streamed["streamed"] and "perplexity" not in streamed
    got, expected = streamed["zero_shot"], memory["zero_shot"]
    assert got["tasks"] == expected["tasks"] and got.keys() == expected.keys()
    assert got["streamed"] and "streamed one decoder layer at a time" in got["protocol"]
    code, _, stderr = run_main(*args, "--low-memory", "--batch-size", "auto")
    assert code == 2 and "fixed batch size" in stderr


def test_cli_prune_low_memory_scores_dense_and_written_pruned_model(llama_shards, text_file, tmp_path):
    """Dense from the source, pruned from the written output, each streamed: what `eval` scores in memory."""
    out = tmp_path / "pruned"
    flags = ["--tasks", TASK, "--limit", "3", "--batch-size", "4", "--quiet", "--json"]
    code, stdout, stderr = run_main(
        "prune", llama_shards, "--method", "wanda", "--sparsity", "0.5", "--calibration", text_file,
        "--nsamples", "2", "--seqlen", "32", "--eval", "none", "--device", "cpu", "--low-memory",
        "--output", out, *flags,
    )  # fmt: skip
    assert code == 0, stderr
    assert "not run on a streamed model" not in stderr
    report = json.loads(stdout)
    assert report["streamed"] and json.loads((out / "report.json").read_text())["zero_shot"] == report["zero_shot"]
    for label, folder in (("dense", llama_shards), ("pruned", out)):
        code, stdout, stderr = run_main("eval", folder, "--eval", "none", *flags)
        assert code == 0, stderr
        result = report["zero_shot"][label]
        assert result["streamed"] and result["tasks"] == json.loads(stdout)["zero_shot"]["tasks"], label


def test_cli_prune_low_memory_refuses_a_generation_task_before_pruning(
    llama_shards, generation_task, text_file, tmp_path
):
    out = tmp_path / "o"
    code, _, stderr = run_main(
        "prune", llama_shards, "--calibration", text_file, "--nsamples", "2", "--seqlen", "32", "--eval", "none",
        "--low-memory", "--output", out, "--tasks", str(generation_task),
    )  # fmt: skip
    assert code == 2 and "gen_task (generate_until)" in stderr and not out.exists()
