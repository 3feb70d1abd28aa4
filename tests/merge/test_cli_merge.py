"""``secateurs delta`` and ``secateurs merge`` end to end on tiny random LLaMA folders (offline, seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_level_tokenizer, run_main, save_tiny_model_dir
from transformers import AutoConfig, AutoModelForCausalLM

from secateurs.merge import (
    DARE,
    TIES,
    TaskArithmetic,
    dare,
    float_tensors,
    load_delta,
    merge,
    task_vector,
)
from secateurs.merge.delta import DELTA_RECORD, DELTA_WEIGHTS


def _finetuned(base_dir, folder, seed: int):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-models")
    base = save_tiny_model_dir(root / "base", "llama")
    wider = root / "wider"
    config = AutoConfig.from_pretrained(base)
    config.intermediate_size = 128
    AutoModelForCausalLM.from_config(config).save_pretrained(wider)
    byte_level_tokenizer().save_pretrained(wider)
    tied = root / "tied"
    config = AutoConfig.from_pretrained(base)
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(tied)
    byte_level_tokenizer().save_pretrained(tied)
    return {
        "tied": tied,
        "base": base,
        "ft1": _finetuned(base, root / "ft1", 1),
        "ft2": _finetuned(base, root / "ft2", 2),
        "gpt2": save_tiny_model_dir(root / "gpt2", "gpt2", bos=False),
        "wider": wider,
        "other_base": save_tiny_model_dir(root / "other-base", "llama", seed=5),
    }


def tensors(folder) -> dict[str, torch.Tensor]:
    return float_tensors(AutoModelForCausalLM.from_pretrained(folder))


def assert_one_error(code, stdout: str, stderr: str) -> str:
    assert code == 2, (code, stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("secateurs: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr and stdout == "", stderr
    return errors[0]


def assert_nothing_left(out) -> None:
    assert not out.exists()
    assert list(out.parent.glob(f".{out.name}.partial-*")) == []


def test_delta_writes_a_compact_folder_and_applies_back(models, tmp_path):
    out = tmp_path / "delta"
    code, stdout, stderr = run_main("delta", models["base"], models["ft1"], "--drop", "0.9", "--output", out, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert {p.name for p in out.iterdir()} == {DELTA_WEIGHTS, DELTA_RECORD, "report.json"}
    saved = json.loads((out / "report.json").read_text())
    assert saved["recipe"]["drop"] == 0.9 and saved["recipe"]["q"] == pytest.approx(0.1)
    assert "Bernoulli" in saved["protocol"] and saved["versions"]["torch"]
    sizes = report["bytes"]
    assert sizes["delta_file_bytes"] == (out / DELTA_WEIGHTS).stat().st_size
    assert sizes["delta_file_bytes"] < 0.3 * sizes["dense_delta_bytes"]
    assert 0.08 < sizes["kept_fraction"] < 0.12
    base, ft = tensors(models["base"]), tensors(models["ft1"])
    want = dare(task_vector(base, ft), 0.9, 0)
    delta = load_delta(out)
    assert all(torch.equal(delta.tensors[k], want[k]) for k in base)

    applied = tmp_path / "applied"
    code, _, stderr = run_main("delta", "apply", models["base"], out, "--output", applied)
    assert code == 0, stderr
    got = tensors(applied)
    assert all(torch.equal(got[k], base[k] + want[k]) for k in base)
    assert json.loads((applied / "report.json").read_text())["kind"] == "delta-apply"


def test_darex_chooses_q_on_text(models, tmp_path, text_file):
    out = tmp_path / "darex"
    argv = ["--rescale", "darex", "--calibration", text_file, "--nsamples", "2", "--seqlen", "16"]
    code, _, stderr = run_main("delta", models["base"], models["ft1"], "--drop", "0.99", *argv, "--output", out)
    assert code == 0, stderr
    recipe = json.loads((out / "report.json").read_text())["recipe"]
    table = recipe["q_search"]["table"]
    assert recipe["q"] == min(table, key=lambda row: row["change"])["q"]
    assert table[0]["q"] == pytest.approx(0.01) and table[-1]["q"] == pytest.approx(1.0)
    # a fixed q is used as given
    fixed = tmp_path / "fixed"
    code, _, stderr = run_main(
        "delta", models["base"], models["ft1"], "--drop", "0.9", "--rescale", "darex", "--q", "0.5", "-o", fixed
    )
    assert code == 0, stderr
    assert load_delta(fixed).recipe["q"] == 0.5


@pytest.mark.parametrize(
    ("method", "extra", "config"),
    [
        ("task-arithmetic", ["--lambda", "0.7"], TaskArithmetic(lam=0.7)),
        ("ties", ["--k", "0.3"], TIES(k=0.3)),
        ("dare-ties", ["--drop", "0.5", "--seed", "3"], TIES(k=1.0, dare=DARE(drop=0.5, seed=3))),
        ("average", [], None),
    ],
)
def test_merge_methods_write_the_api_result(models, tmp_path, method, extra, config):
    out = tmp_path / method
    code, _, stderr = run_main(
        "merge", models["base"], models["ft1"], models["ft2"], "--method", method, *extra, "-o", out
    )
    assert code == 0, stderr
    assert {"config.json", "model.safetensors", "report.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "merge" and report["recipe"]["method"] == method and report["protocol"]
    base = tensors(models["base"])
    vectors = [task_vector(base, tensors(models[m])) for m in ("ft1", "ft2")]
    got = tensors(out)
    if config is None:
        want = {k: (tensors(models["ft1"])[k] + tensors(models["ft2"])[k]) / 2 for k in base}
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in base)
    else:
        want = merge(base, vectors, config)
        assert all(torch.equal(got[k], want[k]) for k in base)


def test_merge_accepts_a_delta_and_adamerging_runs(models, tmp_path, text_file):
    delta = tmp_path / "delta"
    assert run_main("delta", models["base"], models["ft2"], "--drop", "0.5", "-o", delta)[0] == 0
    out = tmp_path / "ta"
    code, _, stderr = run_main("merge", models["base"], models["ft1"], delta, "--method", "task-arithmetic", "-o", out)
    assert code == 0, stderr
    base = tensors(models["base"])
    vectors = [task_vector(base, tensors(models["ft1"])), load_delta(delta).tensors]
    want = merge(base, vectors, TaskArithmetic(lam=1.0))
    assert all(torch.equal(tensors(out)[k], want[k]) for k in base)

    ada = tmp_path / "ada"
    texts = f"{text_file},{text_file}"
    argv = ["--method", "adamerging", "--texts", texts, "--nsamples", "2", "--seqlen", "16", "--steps", "2"]
    code, _, stderr = run_main(
        "merge", models["base"], models["ft1"], models["ft2"], *argv, "--granularity", "task", "-o", ada
    )
    assert code == 0, stderr
    report = json.loads((ada / "report.json").read_text())
    assert report["recipe"]["method"] == "adamerging-task" and len(report["adamerging"]["coefficients"]) == 2


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ("gpt2", "is a GPT2LMHeadModel, the base a LlamaForCausalLM"),
        ("wider", "model.layers.0.mlp.gate_proj.weight is [128, 64] there, [96, 64] in the base"),
        ("tied", "does not match the base: it has no tensor lm_head.weight"),
    ],
)
def test_mismatching_models_are_refused(models, tmp_path, other, message):
    for argv in (
        ("delta", models["base"], models[other]),
        ("merge", models["base"], models["ft1"], models[other], "--method", "ties"),
    ):
        out = tmp_path / "out"
        line = assert_one_error(*run_main(*argv, "--output", out))
        assert message in line, line
        assert_nothing_left(out)


def test_delta_of_another_base_and_bad_settings_are_refused(models, tmp_path):
    delta = tmp_path / "delta"
    assert run_main("delta", models["base"], models["ft1"], "-o", delta)[0] == 0
    out = tmp_path / "out"
    line = assert_one_error(*run_main("delta", "apply", models["other_base"], delta, "-o", out))
    assert "another base" in line
    line = assert_one_error(*run_main("merge", models["other_base"], delta, "--method", "average", "-o", out))
    assert "another base" in line
    for argv in (
        ("delta", models["base"], models["ft1"], "--drop", "1.0"),
        ("delta", models["base"]),
        ("merge", models["base"], models["ft1"], "--method", "ties", "--drop", "0.5"),
        ("merge", models["base"], models["ft1"], "--method", "adamerging"),
        ("delta", "apply", models["base"], models["ft1"]),
    ):
        assert_one_error(*run_main(*argv, "-o", out))
        assert_nothing_left(out)


def test_tied_embeddings_are_merged_once(models, tmp_path):
    """GPT-2 ties its output layer to the input embeddings: the delta holds the weight once, and the applied
    and merged models keep it tied."""
    ft = _finetuned(models["gpt2"], tmp_path / "gpt2-ft", 3)
    delta, applied = tmp_path / "delta", tmp_path / "applied"
    assert run_main("delta", models["gpt2"], ft, "--drop", "0.5", "-o", delta)[0] == 0
    assert "lm_head.weight" not in load_delta(delta).tensors and "transformer.wte.weight" in load_delta(delta).tensors
    assert run_main("delta", "apply", models["gpt2"], delta, "-o", applied)[0] == 0
    model = AutoModelForCausalLM.from_pretrained(applied)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    base = tensors(models["gpt2"])
    want = dare(task_vector(base, tensors(ft)), 0.5, 0)
    assert torch.equal(model.lm_head.weight, base["transformer.wte.weight"] + want["transformer.wte.weight"])
