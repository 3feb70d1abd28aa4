"""Mask-preserving fine-tuning (``secateurs finetune``) on a tiny offline LLaMA pruned by the CLI."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from conftest import run_main
from safetensors.torch import load_file

from secateurs.errors import SecateursError
from secateurs.loading import load_masks, load_pruned
from secateurs.train.finetune import finetune, training_windows

FAST_EVAL = ["--eval-windows", "2", "--eval-seqlen", "32"]


def _prune(tiny_model_dir, text_file, out, *how):
    code, _, stderr = run_main(
        "prune",
        tiny_model_dir,
        "--method",
        "wanda",
        *how,
        "--calibration",
        text_file,
        "--eval",
        text_file,
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--eval-windows",
        "2",
        "--output",
        out,
        "--quiet",
    )
    assert code == 0, stderr
    return out


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dir, text_file, tmp_path_factory):
    torch.set_num_threads(1)
    return _prune(tiny_model_dir, text_file, tmp_path_factory.mktemp("ft") / "pruned", "--sparsity", "0.5")


def saved_weights(folder) -> dict[str, torch.Tensor]:
    """{linear: weight [out, in]} as saved (a plain HF folder or a sparse one)."""
    if (folder / "model.safetensors").is_file():
        return {k.removesuffix(".weight"): v for k, v in load_file(folder / "model.safetensors").items()}
    model, _ = load_pruned(folder)
    return {k.removesuffix(".weight"): v.detach() for k, v in model.state_dict().items()}


def assert_same_sparsity(pruned, tuned, masks, nm: int | None = None, transposed: bool = False) -> None:
    """Every pruned position zero in ``tuned``, every row's zero count (and N:M group's) as in ``pruned``."""
    before, after = saved_weights(pruned), saved_weights(tuned)
    changed = 0
    for name, mask in masks.items():
        W0, W1 = before[name], after[name]
        if transposed:  # GPT-2's Conv1D stores [in, out]
            W0, W1 = W0.t(), W1.t()
        assert torch.all(W1[mask] == 0), name
        assert torch.equal((W0 == 0).sum(1), (W1 == 0).sum(1)), name
        if nm:
            g0 = (W0 == 0).reshape(W0.shape[0], -1, nm).sum(2)
            g1 = (W1 == 0).reshape(W1.shape[0], -1, nm).sum(2)
            assert torch.equal(g0, g1), name
        changed += int((W0 != W1).sum())
    assert changed > 0  # training moved the kept weights


def test_full_finetune_keeps_masks_and_lowers_the_loss(pruned_dir, text_file, tmp_path):
    out = tmp_path / "full"
    _, _, report = finetune(
        pruned_dir,
        data=str(text_file),
        steps=16,
        seqlen=32,
        lr=1e-3,
        eval_source="shakespeare",
        eval_windows=2,
        eval_seqlen=32,
        output=out,
        progress=False,
    )
    loss = report["finetune"]["loss"]
    assert loss["mean_last"] < loss["mean_first"]
    ppl = report["perplexity"]
    assert ppl["before"]["perplexity"] != ppl["after"]["perplexity"]
    assert ppl["before"]["protocol"] == ppl["after"]["protocol"]
    assert report["finetune"]["tokens"] == 16 * 32
    assert report["finetune"]["mode"] == "full" and report["finetune"]["lora"] is None
    assert report["finetune"]["peak_rss_bytes"] > 0
    check = report["sparsity"]
    assert check["pruned_zero"] and check["rows_unchanged"]
    assert check["overall_before"] == check["overall_after"] == pytest.approx(0.5, abs=0.01)
    assert all(v["before"] == v["after"] for v in check["linears"].values())
    masks = load_masks(pruned_dir)
    assert {k: v for k, v in load_masks(out).items()}.keys() == masks.keys()
    assert all(torch.equal(load_masks(out)[k], masks[k]) for k in masks)
    assert_same_sparsity(pruned_dir, out, masks)
    saved = json.loads((out / "report.json").read_text())
    assert saved["perplexity"]["after"]["perplexity"] == ppl["after"]["perplexity"]


def test_lora_merge_keeps_pruned_weights_zero_sparse_format(pruned_dir, text_file, tmp_path):
    out = tmp_path / "lora"
    model, _, report = finetune(
        pruned_dir,
        data=str(text_file),
        steps=8,
        seqlen=32,
        lr=5e-3,
        lora=4,
        eval_source="none",
        output=out,
        save_format="sparse",
        progress=False,
    )
    assert type(model).__name__ == "LlamaForCausalLM"  # adapters merged and gone
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert report["finetune"]["lora"]["rank"] == 4
    assert report["perplexity"]["before"] is None
    assert report["sparsity"]["pruned_zero"] and report["sparsity"]["rows_unchanged"]
    assert (out / "model.sparse.safetensors").is_file()
    assert_same_sparsity(pruned_dir, out, load_masks(pruned_dir))
    # a sparse-format folder is a valid input too
    _, _, again = finetune(out, data=str(text_file), steps=2, seqlen=32, eval_source="none", progress=False)
    assert again["sparsity"]["pruned_zero"] and again["recipe"] == report["recipe"]


def test_nm_pattern_groups_unchanged_and_masks_from_zeros(tiny_model_dir, text_file, tmp_path):
    pruned = _prune(tiny_model_dir, text_file, tmp_path / "nm", "--pattern", "2:4")
    masks = load_masks(pruned)
    (pruned / "masks.safetensors").unlink()  # masks then come from the weights' zeros
    out = tmp_path / "nm-tuned"
    _, _, report = finetune(
        pruned, data=str(text_file), steps=4, seqlen=32, lr=1e-3, eval_source="none", output=out, progress=False
    )
    check = report["sparsity"]
    assert check["pattern"] == "2:4" and check["groups_unchanged"] and check["groups_ok"]
    assert_same_sparsity(pruned, out, masks, nm=4)


def test_cli_round_trip_json(pruned_dir, text_file, tmp_path):
    out = tmp_path / "cli"
    argv = ["finetune", pruned_dir, "--data", text_file, "--steps", "3", "--seqlen", "32", "--seed", "1"]
    code, stdout, stderr = run_main(*argv, "--eval", "shakespeare", *FAST_EVAL, "--output", out, "--json", "--quiet")
    assert code == 0, stderr
    report = json.loads(stdout)
    for key in ("before", "after"):
        assert report["perplexity"][key]["perplexity"] > 0
    assert report["finetune"]["lr"] == 2e-5 and report["finetune"]["seed"] == 1
    assert report["output"] == str(out.absolute())
    assert {"config.json", "model.safetensors", "masks.safetensors", "report.json"} <= {p.name for p in out.iterdir()}
    assert_same_sparsity(pruned_dir, out, load_masks(pruned_dir))
    # an existing output needs --overwrite; with it, the fine-tuned folder is itself a valid input
    code, _, stderr = run_main(*argv, "--eval", "none", "--output", out, "--quiet")
    assert code == 2 and "--overwrite" in stderr
    code, _, stderr = run_main("finetune", out, "--data", text_file, "--steps", "2", "--seqlen", "32", "--eval", "none")
    assert code == 0, stderr


def _one_line_error(*argv) -> str:
    code, _, stderr = run_main(*argv)
    assert code == 2
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("secateurs: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_bad_inputs_are_one_line_errors(pruned_dir, tiny_model_dir, text_file, tmp_path, monkeypatch):
    fast = ["--data", text_file, "--seqlen", "32", "--eval", "none", "--quiet"]
    assert "does not exist" in _one_line_error("finetune", tmp_path / "missing", *fast)
    assert "not a secateurs prune output" in _one_line_error("finetune", tiny_model_dir, *fast)
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _one_line_error("finetune", tmp_path / "empty", *fast)
    assert "steps must be a positive integer" in _one_line_error("finetune", pruned_dir, "--steps", "0", *fast)
    assert "seqlen" in _one_line_error(
        "finetune", pruned_dir, "--data", text_file, "--seqlen", "4096", "--eval", "none"
    )
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    message = _one_line_error("finetune", pruned_dir, "--lora", "4", *fast)
    assert "peft" in message and "secateurs[finetune]" in message
    with pytest.raises(SecateursError, match="LoRA rank"):
        finetune(pruned_dir, lora=0)
    with pytest.raises(SecateursError, match="learning rate"):
        finetune(pruned_dir, lr=-1.0)


def test_training_windows_follow_the_calibration_draw(pruned_dir, text_file):
    from transformers import AutoTokenizer

    from secateurs.data import calibration_windows

    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    calib = calibration_windows(str(text_file), tokenizer, 4, 32, seed=3)
    windows = training_windows(str(text_file), tokenizer, 500, 32, seed=3)  # more tokens than the text holds
    assert windows.shape == (500, 32)
    assert torch.equal(windows[:4], calib)


def test_a_copied_folder_without_report_but_with_masks_is_accepted(pruned_dir, text_file, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(pruned_dir, copy)
    (copy / "report.json").unlink()
    _, _, report = finetune(copy, data=str(text_file), steps=2, seqlen=32, eval_source="none", progress=False)
    assert report["recipe"] is None and report["sparsity"]["pruned_zero"]


def test_full_finetune_of_gpt2_conv1d_keeps_masks(tiny_gpt2_dir, text_file, tmp_path):
    """GPT-2 keeps its linears as Conv1D ([in, out]): the [out, in] masks are held transposed while training."""
    pruned = _prune(tiny_gpt2_dir, text_file, tmp_path / "gpt2", "--sparsity", "0.5")
    out = tmp_path / "gpt2-tuned"
    _, _, report = finetune(
        pruned, data=str(text_file), steps=6, seqlen=32, lr=1e-3, eval_source="none", output=out, progress=False
    )
    assert report["finetune"]["mode"] == "full"
    assert report["sparsity"]["pruned_zero"] and report["sparsity"]["rows_unchanged"]
    assert_same_sparsity(pruned, out, load_masks(pruned), transposed=True)


def test_nm_refuses_conv1d():
    from transformers.pytorch_utils import Conv1D

    from secateurs.train import SRSTE, SparseTraining

    model = torch.nn.Sequential(Conv1D(8, 16))
    with pytest.raises(SecateursError, match="Conv1D keeps as its first axis"):
        SparseTraining(model, None, SRSTE(), pattern="2:4")
