"""The compact sparse checkpoint: bit-identical round trips, bytes, bad files, and the CLI that writes it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAMILIES, VOCAB, run_main, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import secateurs
from secateurs import sparse_format
from secateurs.errors import SecateursError
from secateurs.models import weight_view
from secateurs.sparse_format import WEIGHTS_NAME, load_pruned, save_sparse

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bit patterns (so -0.0 != +0.0 and NaN == NaN)."""
    return t.detach().contiguous().view(_INT[t.element_size()])


def assert_bit_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert sa[key].shape == sb[key].shape, key
        assert torch.equal(bits(sa[key]), bits(sb[key])), key


def pruned_tiny(family: str, dtype=torch.float32, sparsity: float = 0.7, **recipe):
    model = tiny_model(family).to(dtype)
    secateurs.prune(model, secateurs.Recipe(method="magnitude", sparsity=sparsity, **recipe), progress=False)
    return model


def partial_dirs(parent) -> list:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


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
    assert summary["packed_linears"] == len(sparse_format.decoder_linears(model))
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


def test_bytes_ratio_at_70_percent(tmp_path):
    """Target: at 70% the packed linears take <= 0.40x their dense bytes (fp32 1.325/4, bf16 0.725/2 per weight)."""
    for dtype, expected in ((torch.float32, 0.3 + 1 / 32), (torch.bfloat16, 0.3 + 1 / 16)):
        model = pruned_tiny("llama", dtype)
        summary = save_sparse(model, None, tmp_path / str(dtype), progress=False)
        assert summary["linear_ratio"] == pytest.approx(expected, abs=0.01)
        assert summary["linear_ratio"] <= 0.40
        with safe_open(tmp_path / str(dtype) / WEIGHTS_NAME, "pt") as f:
            stored = sum(f.get_tensor(k).nbytes for k in f.keys() if ".mlp." in k)
        dense = sum(
            m.weight.numel() * m.weight.element_size() for n, m in model.named_modules() if ".mlp." in n and "proj" in n
        )
        assert stored / dense <= 0.40


def test_conv1d_packs_what_the_layer_multiplies_with(tmp_path):
    model = pruned_tiny("gpt2")
    save_sparse(model, None, tmp_path / "g", progress=False)
    with safe_open(tmp_path / "g" / WEIGHTS_NAME, "pt") as f:
        packed = json.loads(f.metadata()["packed"])
        mask = f.get_tensor("transformer.h.0.attn.c_attn.weight.mask")
    entry = packed["transformer.h.0.attn.c_attn.weight"]
    conv = model.transformer.h[0].attn.c_attn
    assert entry["transposed"] is True and entry["shape"] == list(conv.weight.shape)  # [in, out] as held
    W = weight_view(conv)  # [out, in]
    assert mask.shape == (W.shape[0], math.ceil(W.shape[1] / 8))
    first_row = [(int(mask[0, j // 8]) >> (j % 8)) & 1 for j in range(W.shape[1])]
    assert first_row == (W[0] != 0).int().tolist()


def test_negative_zero_nan_and_full_rows_survive(tmp_path):
    model = pruned_tiny("llama")
    W = model.model.layers[0].self_attn.q_proj.weight.data
    W[0, :5] = -0.0
    W[1, :] = torch.randn(W.shape[1])  # a dense row
    W[2, :] = 0.0  # an empty row
    W[3, 3] = float("nan")
    save_sparse(model, None, tmp_path / "z", progress=False)
    back, _ = load_pruned(tmp_path / "z")
    assert_bit_identical(model, back)
    assert torch.signbit(back.model.layers[0].self_attn.q_proj.weight[0, :5]).all()


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
    assert sparse_format.packed_bytes(8, 64, 8 * 62, 4) == 8 * 64 * 4
    assert sparse_format.break_even_sparsity(4) == pytest.approx(1 / 32)
    model = tiny_model("llama")  # dense: nothing worth packing
    _, packed, _, sizes, dense = sparse_format._collect(model, None, False)
    assert packed == {} and sizes["linear_checkpoint_bytes"] == sizes["linear_dense_bytes"]
    assert len(dense) == len(sparse_format.decoder_linears(model))


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


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def saved(tmp_path):
    model = pruned_tiny("gpt2")
    save_sparse(model, None, tmp_path / "s", progress=False)
    return tmp_path / "s"


def rewrite(folder, edit):
    """Rewrite the weights file through ``edit(tensors, metadata)``."""
    path = folder / WEIGHTS_NAME
    with safe_open(path, "pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(path)
    edit(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


KEY = "transformer.h.0.mlp.c_fc.weight"


def _packed(metadata, change):
    packed = json.loads(metadata["packed"])
    change(packed)
    metadata["packed"] = json.dumps(packed)


BAD = {
    "format": (lambda t, m: m.update(format="other"), "not a secateurs-sparse checkpoint"),
    "version": (lambda t, m: m.update(format_version="99"), "version '99'"),
    "packed json": (lambda t, m: m.update(packed="{not json"), "not valid JSON"),
    "no aliases": (lambda t, m: m.pop("aliases"), "'aliases' is missing"),
    "entry": (lambda t, m: _packed(m, lambda p: p[KEY].update(nnz=-1)), "malformed metadata"),
    "dtype": (lambda t, m: _packed(m, lambda p: p[KEY].update(dtype="int8")), "malformed metadata"),
    "shape": (lambda t, m: _packed(m, lambda p: p[KEY].update(shape=[64, 128])), "the model expects [64, 256]"),
    "nnz": (lambda t, m: _packed(m, lambda p: p[KEY].update(nnz=p[KEY]["nnz"] - 1)), f"{KEY}.values is"),
    "mask bits": (lambda t, m: t[f"{KEY}.mask"].__setitem__((0, 0), t[f"{KEY}.mask"][0, 0] ^ 1), "inconsistent"),
    "mask dtype": (lambda t, m: t.update({f"{KEY}.mask": t[f"{KEY}.mask"].to(torch.int16)}), f"{KEY}.mask is"),
    "missing part": (lambda t, m: t.pop(f"{KEY}.values"), f"{KEY}.values is missing"),
    "unknown packed": (lambda t, m: _packed(m, lambda p: p.update(nope=p[KEY])), "nope is not a weight of this"),
    "extra tensor": (lambda t, m: t.update(stray=torch.zeros(2)), "tensor stray is not part of this model"),
    "missing tensor": (lambda t, m: t.pop("transformer.ln_f.weight"), "lacks tensors the model needs"),
    "dense shape": (lambda t, m: t.update({"transformer.ln_f.bias": torch.zeros(3)}), "ln_f.bias is shape [3]"),
    "alias": (lambda t, m: m.update(aliases=json.dumps({"lm_head.weight": "nowhere"})), "bad tied tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_one_clear_error(saved, case):
    edit, message = BAD[case]
    rewrite(saved, edit)
    with pytest.raises(SecateursError) as info:
        load_pruned(saved)
    assert message in str(info.value), str(info.value)


def test_truncated_and_garbage_files(saved):
    path = saved / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SecateursError, match="truncated or corrupt"):
        load_pruned(saved)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(SecateursError, match="truncated or corrupt"):
        load_pruned(saved)


def test_not_a_sparse_folder(tmp_path, tiny_model_dir):
    with pytest.raises(SecateursError, match="no model.sparse.safetensors"):
        load_pruned(tiny_model_dir)
    with pytest.raises(SecateursError, match="no config.json"):
        load_pruned(tmp_path)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_sparse(pruned_tiny("llama"), None, tmp_path / "never", progress=False)
    assert list(tmp_path.iterdir()) == []


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
    secateurs.export.save_pruned(model, tokenizer, p)
    save_sparse(model, tokenizer, c, progress=False)
    argv = [a.format(tmp=tmp_path, p=p, c=c) for a in argv]
    code, out, err = run_main("compress", *argv, "--quiet")
    assert code == 2 and out == ""
    assert err.startswith("secateurs: error:") and message in err, err
    assert not (tmp_path / "x").exists() and not partial_dirs(tmp_path)
