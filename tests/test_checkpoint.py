"""Saving pruned models and reading them back (secateurs.checkpoint): bit-identical round trips, what stays dense,
atomic writes, and the CLI that writes sparse folders (prune --save-format sparse, compress)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, VOCAB, run_main, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file
from sparse_models import assert_bit_identical, bits, partial_dirs, pruned_tiny
from transformers import AutoModelForCausalLM

import secateurs
from secateurs import checkpoint
from secateurs.checkpoint import load_pruned, save_pruned, save_sparse
from secateurs.errors import SecateursError
from secateurs.format.bits import break_even_sparsity, packed_bytes
from secateurs.format.sparse import WEIGHTS_NAME, PackedTensor
from secateurs.models import decoder_linears


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_bit_identical(family, dtype, tmp_path):
    model = pruned_tiny(family, dtype)
    summary = save_sparse(model, None, tmp_path / "out", progress=False)
    back, tokenizer = load_pruned(tmp_path / "out")
    assert tokenizer is None
    assert_bit_identical(model, back)
    assert back.dtype == dtype
    assert summary["packed_linears"] == len(decoder_linears(model))
    assert not summary["dense_linears"]
    assert summary["linear_ratio"] <= 0.40, summary
    assert summary["folder_ratio"] < 0.75, summary
    if model.config.tie_word_embeddings:
        assert back.get_output_embeddings().weight is back.get_input_embeddings().weight
    # the same model as Hugging Face's own round trip (which, unlike model.to(bf16), keeps rotary buffers in fp32)
    model.save_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, back(ids).logits)


def test_excluded_and_barely_sparse_linears_stay_dense(tmp_path):
    model = pruned_tiny("opt", exclude=["*.fc2"])  # fc2 dense (0% sparse), all OPT linears have biases
    summary = save_sparse(model, None, tmp_path / "o", progress=False)
    assert sorted(summary["dense_linears"]) == [f"model.decoder.layers.{i}.fc2" for i in range(2)]
    with safe_open(tmp_path / "o" / WEIGHTS_NAME, "pt") as f:
        keys = set(f.keys())
    assert "model.decoder.layers.0.fc2.weight" in keys and "model.decoder.layers.0.fc1.weight.mask" in keys
    assert "model.decoder.layers.0.fc1.bias" in keys
    back, _ = load_pruned(tmp_path / "o")
    assert_bit_identical(model, back)
    # min_sparsity: only linears at least this sparse are packed
    summary = save_sparse(model, None, tmp_path / "o2", min_sparsity=0.8, progress=False)
    assert summary["packed_linears"] == 0
    assert_bit_identical(model, load_pruned(tmp_path / "o2")[0])


def test_break_even():
    # a fp32 weight with 1/32 of its entries gone packs into exactly its dense size
    assert packed_bytes(8, 64, 8 * 62, 4) == 8 * 64 * 4
    assert break_even_sparsity(4) == pytest.approx(1 / 32)
    model = tiny_model("llama")  # dense: nothing worth packing
    tensors, _, sizes, dense = checkpoint._collect(model, None, False)
    assert not any(isinstance(t, PackedTensor) for t in tensors.values())
    assert sizes["linear_checkpoint_bytes"] == sizes["linear_dense_bytes"]
    assert len(dense) == len(decoder_linears(model))


def test_float16_stays_dense(tmp_path):
    model = pruned_tiny("llama", torch.float16)
    summary = save_sparse(model, None, tmp_path / "h", progress=False)
    assert summary["packed_linears"] == 0
    assert_bit_identical(model, load_pruned(tmp_path / "h")[0])


def test_sparsified_model_saves_the_same(tmp_path):
    model = pruned_tiny("gpt2")
    save_sparse(model, None, tmp_path / "a", progress=False)
    sparse, _ = secateurs.load_sparse(tmp_path / "a", min_sparsity=0.0)
    save_sparse(sparse, None, tmp_path / "b", progress=False)
    assert_bit_identical(model, load_pruned(tmp_path / "b")[0])
    a, b = load_file(tmp_path / "a" / WEIGHTS_NAME), load_file(tmp_path / "b" / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)


def test_tokenizer_generation_config_and_report(tmp_path, tiny_model_dir):
    model, tokenizer, _ = secateurs.load_model(str(tiny_model_dir))
    secateurs.prune(model, "magnitude", progress=False)
    model.generation_config.max_new_tokens = 7
    save_sparse(model, tokenizer, tmp_path / "t", {"sparsity": 0.5}, progress=False)
    back, tok = load_pruned(tmp_path / "t")
    assert tok("hello").input_ids == tokenizer("hello").input_ids
    assert back.generation_config.max_new_tokens == 7
    assert json.loads((tmp_path / "t" / "report.json").read_text()) == {"sparsity": 0.5}
    assert_bit_identical(model, back)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_sparse(pruned_tiny("llama"), None, tmp_path / "never", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_old_import_paths_still_work():
    from secateurs import export, sparse_format

    assert export.save_pruned is save_pruned and sparse_format.save_sparse is save_sparse
    assert sparse_format.load_pruned is load_pruned and sparse_format.add_parser is checkpoint.add_parser
    assert export.check_output is checkpoint.check_output and sparse_format.WEIGHTS_NAME == WEIGHTS_NAME


def test_save_pruned_hf_and_unknown_format(tmp_path):
    model = pruned_tiny("llama")
    save_pruned(model, None, tmp_path / "hf", {"sparsity": 0.7})
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "hf" / "report.json").read_text()) == {"sparsity": 0.7}
    assert_bit_identical(model, AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))
    save_pruned(model, None, tmp_path / "sp", save_format="sparse")
    assert_bit_identical(model, load_pruned(tmp_path / "sp")[0])
    with pytest.raises(SecateursError, match="unknown save format 'gguf'"):
        save_pruned(model, None, tmp_path / "x", save_format="gguf")
    with pytest.raises(SecateursError, match="exists and is not empty"):
        save_pruned(model, None, tmp_path / "hf")
    assert not partial_dirs(tmp_path)


# ------------------------------------------------------------------------------------------------------ CLI
FAST = ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--quiet"]


def test_cli_prune_save_format_sparse(tmp_path, tiny_gpt2_dir):
    code, out, err = run_main("prune", tiny_gpt2_dir, "--sparsity", "0.7", *FAST, "-o", tmp_path / "p", "--json")
    code2, _, _ = run_main(
        "prune", tiny_gpt2_dir, "--sparsity", "0.7", *FAST, "-o", tmp_path / "s", "--save-format", "sparse"
    )
    assert code == 0 and code2 == 0, err
    assert (tmp_path / "s" / WEIGHTS_NAME).is_file() and not (tmp_path / "s" / "model.safetensors").exists()
    assert json.loads((tmp_path / "s" / "report.json").read_text())["sparsity"] == json.loads(out)["sparsity"]
    dense, _, _ = secateurs.load_model(str(tmp_path / "p"))
    back, tokenizer = load_pruned(tmp_path / "s")
    assert tokenizer is not None
    assert_bit_identical(dense, back)
    # every command that takes a model folder reads the sparse one too
    via_load_model, _, _ = secateurs.load_model(str(tmp_path / "s"))
    assert_bit_identical(dense, via_load_model)


def test_cli_compress(tmp_path, tiny_model_dir):
    assert run_main("prune", tiny_model_dir, "--sparsity", "0.7", *FAST, "-o", tmp_path / "p")[0] == 0
    code, out, err = run_main("compress", tmp_path / "p", "-o", tmp_path / "c", "--json", "--quiet")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["linear_ratio"] <= 0.40 and summary["source_ratio"] < 0.6
    assert summary["source_folder_bytes"] > summary["folder_bytes"]
    assert (tmp_path / "c" / "report.json").read_text() == (tmp_path / "p" / "report.json").read_text().strip() + "\n"
    dense, _, _ = secateurs.load_model(str(tmp_path / "p"))
    assert_bit_identical(dense, load_pruned(tmp_path / "c")[0])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{c}", "-o", "{tmp}/x"], "already a sparse checkpoint"),
        (["{tmp}/nothing", "-o", "{tmp}/x"], "not a Hugging Face model folder"),
        (["{p}", "-o", "{p}"], "must differ from the source"),
        (["{p}", "-o", "{c}"], "exists and is not empty"),
        (["{p}", "-o", "{tmp}/x", "--min-sparsity", "2"], "--min-sparsity must be in [0, 1]"),
    ],
)
def test_cli_compress_errors(tmp_path, tiny_model_dir, argv, message):
    p, c = tmp_path / "p", tmp_path / "c"
    model, tokenizer, _ = secateurs.load_model(str(tiny_model_dir))
    save_pruned(model, tokenizer, p)
    save_sparse(model, tokenizer, c, progress=False)
    argv = [a.format(tmp=tmp_path, p=p, c=c) for a in argv]
    code, out, err = run_main("compress", *argv, "--quiet")
    assert code == 2 and out == ""
    assert err.startswith("secateurs: error:") and message in err, err
    assert not (tmp_path / "x").exists() and not partial_dirs(tmp_path)
