"""``secateurs eval DIR --int8-activations``: the folder measured on the kernel as bench and the decoder run it."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_main

import secateurs
from secateurs.checkpoint import save_sparse
from secateurs.runtime import kernels
from secateurs.runtime.linear import load_sparse

TASK = "bible_next_sentence"
SETTINGS = ["--seqlen", "32", "--eval-windows", "3", "--quiet"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir):
    """The tiny LLaMA pruned 60% by magnitude, saved as sparse folders with int8 and with float32 values; 1024
    positions (rotary: the weights do not depend on it), room for a bundled zero-shot passage and its choices."""
    tmp = tmp_path_factory.mktemp("int8-eval")
    model, tokenizer, _ = secateurs.load_model(str(tiny_model_dir))
    secateurs.prune(model, secateurs.Recipe(method="magnitude", sparsity=0.6), progress=False)
    save_sparse(model, tokenizer, tmp / "i8", progress=False, values="int8")
    save_sparse(model, tokenizer, tmp / "f32", progress=False)
    config = json.loads((tmp / "i8" / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (tmp / "i8" / "config.json").write_text(json.dumps(config))
    return tmp / "i8", tmp / "f32"


def test_eval_measures_the_kernel_with_int8_activations(folders, text_file):
    """The printed perplexity is that of load_sparse(DIR, head="int8", int8_activations=True), not of the
    dequantised dense weights that a plain eval measures."""
    int8, _ = folders
    code, out, err = run_main("eval", int8, "--eval", text_file, *SETTINGS, "--json", "--int8-activations")
    assert code == 0, err
    result = json.loads(out)
    model, tokenizer = load_sparse(int8, head="int8", int8_activations=True)
    want = secateurs.evaluate(model, tokenizer, str(text_file), seqlen=32, max_windows=3, progress=False)
    assert result["perplexity"] == pytest.approx(want.perplexity, rel=1e-9)
    assert result["protocol"] == want.protocol and result["windows"] == 3
    assert result["model"] == str(int8.resolve()) and result["dtype"] == "float32"
    # 3 layers x 7 linears (q, k, v, o, gate, up, down); the head counted apart
    assert result["int8_activations"] == {"linears": 21, "head": "int8", "vnni": kernels.vnni_available()}

    code, out, err = run_main("eval", int8, "--eval", text_file, *SETTINGS, "--json")
    assert code == 0, err
    plain = json.loads(out)
    assert "int8_activations" not in plain
    assert plain["perplexity"] != result["perplexity"]
    assert plain["perplexity"] == pytest.approx(result["perplexity"], rel=0.05)

    # --dtype bfloat16: the model of bench --dtype bfloat16 --head int8 --int8-activations
    argv = ["eval", int8, "--eval", text_file, *SETTINGS, "--json", "--dtype", "bfloat16", "--int8-activations"]
    code, out, err = run_main(*argv)
    assert code == 0, err
    bf16 = json.loads(out)
    assert bf16["dtype"] == "bfloat16"
    model, tokenizer = load_sparse(int8, dtype="bfloat16", head="int8", int8_activations=True)
    want = secateurs.evaluate(model, tokenizer, str(text_file), seqlen=32, max_windows=3, progress=False)
    assert bf16["perplexity"] == pytest.approx(want.perplexity, rel=1e-9)


def test_eval_int8_activations_with_zero_shot(folders):
    """--tasks scores the same kernel model: the accuracy zero_shot gives on load_sparse's model."""
    pytest.importorskip("lm_eval")
    from secateurs.evaluate.zeroshot import zero_shot

    int8, _ = folders
    argv = ["--eval", "none", "--tasks", TASK, "--limit", "4", "--batch-size", "2", "--json", "--quiet"]
    code, out, err = run_main("eval", int8, *argv, "--int8-activations")
    assert code == 0, err
    result = json.loads(out)
    assert result["int8_activations"]["head"] == "int8" and "perplexity" not in result
    model, tokenizer = load_sparse(int8, head="int8", int8_activations=True)
    want = zero_shot(model, tokenizer, [TASK], limit=4, batch_size=2, progress=False)
    assert result["zero_shot"]["tasks"][TASK]["examples"] == 4
    assert result["zero_shot"]["tasks"][TASK]["metrics"] == want.to_dict()["tasks"][TASK]["metrics"]


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("f32", [], "needs int8 values; .* holds float32 values"),
        ("dense", [], "is not a sparse folder"),
        ("hub", [], "is not a sparse folder"),
        ("i8", ["--low-memory"], "not with --low-memory"),
        ("i8", ["--activation-sparsity", "0.3"], "not with --activation-sparsity"),
        ("i8", ["--device", "cuda"], "use --device cpu"),
        ("i8", ["--dtype", "float16"], "float32 or bfloat16"),
    ],
)
def test_eval_int8_activations_refusals(folders, tiny_model_dir, text_file, monkeypatch, case, extra, message):
    """One error line, exit code 2, before anything is loaded."""
    int8, f32 = folders
    model = {"i8": int8, "f32": f32, "dense": tiny_model_dir, "hub": "HuggingFaceTB/SmolLM2-135M"}[case]

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a model before refusing")

    monkeypatch.setattr("secateurs.runtime.linear.load_sparse", no_loading)
    monkeypatch.setattr("secateurs.models.load_model", no_loading)
    code, out, err = run_main("eval", model, "--eval", text_file, *SETTINGS, *extra, "--int8-activations")
    assert code == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secateurs: error: eval --int8-activations"), err
    assert re.search(message, lines[0]), lines[0]
