"""Sparse linears (secateurs.runtime.linear): SparseLinear, to_sparse_linears, load_sparse, on tiny models and the
real SmolLM2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FAMILIES, VOCAB, tiny_model
from sparse_models import assert_bit_identical, pruned_tiny
from transformers.pytorch_utils import Conv1D

import secateurs
from secateurs.checkpoint import load_pruned, save_pruned, save_sparse
from secateurs.errors import SecateursError
from secateurs.models import decoder_linears, weight_view
from secateurs.runtime import kernels, timing
from secateurs.runtime.linear import SparseLinear, load_sparse, sparsify, to_sparse_linears


def tolerance(dtype):
    return {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}


def sparse_weight(rows, cols, sparsity=0.7, dtype=torch.float32):
    W = torch.randn(rows, cols)
    W[torch.rand(rows, cols) < sparsity] = 0
    return W.to(dtype)


# ------------------------------------------------------------------------------------------ SparseLinear
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 17), (33, 64), (96, 100)])
def test_sparse_linear_matches_linear(rows, cols, w_dtype, x_dtype):
    linear = torch.nn.Linear(cols, rows).to(w_dtype)
    linear.weight.data = sparse_weight(rows, cols, dtype=w_dtype)
    sparse = SparseLinear.from_dense(linear)
    x = torch.randn(2, 5, cols).to(x_dtype)
    with torch.no_grad():
        want = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
        got = sparse(x)
    assert got.dtype == x_dtype and got.shape == (2, 5, rows)
    torch.testing.assert_close(got.float(), want, **tolerance(x_dtype))
    assert torch.equal(sparse.dense_weight(), linear.weight.data)


def test_sparse_linear_from_conv1d():
    conv = Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs: weight [40, 24]
    conv.weight.data = sparse_weight(40, 24)
    conv.bias.data.normal_()
    sparse = SparseLinear.from_dense(conv)
    assert sparse.transposed and sparse.packed.shape == (24, 40)
    x = torch.randn(3, 40)
    torch.testing.assert_close(sparse(x), conv(x).detach(), atol=1e-5, rtol=1e-4)
    assert torch.equal(sparse.dense_weight(), conv.weight.data)
    assert "density=" in repr(sparse) and sparse.nbytes < conv.weight.numel() * 4


def test_sparse_linear_rejects_bad_bias():
    p = kernels.pack(sparse_weight(4, 8))
    with pytest.raises(ValueError, match="bias shape"):
        SparseLinear(p, torch.zeros(5))


# ---------------------------------------------------------------------------------------- to_sparse_linears
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_to_sparse_linears_matches_dense_masked(family, dtype):
    dense = pruned_tiny(family, dtype)
    sparse = copy.deepcopy(dense)
    summary = to_sparse_linears(sparse)
    linears = sum(isinstance(m, SparseLinear) for m in sparse.modules())
    assert summary["converted"] == linears > 0 and not summary["dense"]
    assert summary["sparse_bytes"] < 0.5 * summary["dense_bytes"]
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        want, got = dense(ids).logits, sparse(ids).logits
    torch.testing.assert_close(got.float(), want.float(), **tolerance(dtype))
    if dtype == torch.float32:  # greedy decoding gives the same tokens
        assert torch.equal(timing.generate(dense, ids[:1], 10), timing.generate(sparse, ids[:1], 10))


@pytest.mark.parametrize("values", [None, "int8"], ids=["float", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_by_outer_products_keeps_the_logits(dtype, values, monkeypatch):
    """A 2 x 75-token prompt (150 rows a linear: two blocks of 64 tokens and a ragged one) through the kernel's
    default prefill path, with q/k/v and gate/up fused: on AVX-512 outer products (the bf16 pair form for bf16
    activations), never tiles at 70%. The logits are the dense masked model's, to fp32 accumulation error in fp32;
    with int8 values, the same model on the inner-product kernel (token by token) to fp32 accumulation error."""
    from secateurs.runtime.fused import fuse_shared_inputs

    dense = pruned_tiny("llama", dtype)
    sparse = copy.deepcopy(dense)
    to_sparse_linears(sparse)
    if values:
        for m in sparse.modules():
            if isinstance(m, SparseLinear):
                m.packed = kernels.pack(kernels.unpack(m.packed), values)
    fuse_shared_inputs(sparse)
    if kernels.isa() == "avx512":
        monkeypatch.setattr(kernels, "_spmm_tiled", None)  # (never called)
    ids = torch.randint(0, VOCAB, (2, 75))
    with torch.no_grad():
        got = sparse(ids).logits
        if values is None:
            torch.testing.assert_close(got.float(), dense(ids).logits.float(), **tolerance(dtype))
        kernels.set_outer_rows(kernels.NEVER)
        try:
            blocks = sparse(ids).logits
        finally:
            kernels.set_outer_rows(None)
    torch.testing.assert_close(got.float(), blocks.float(), **tolerance(dtype))


def test_to_sparse_linears_threshold_and_dense_models():
    model = pruned_tiny("opt", exclude=["*.fc2"], sparsity=0.5)
    summary = to_sparse_linears(model, min_sparsity=0.3)
    assert sorted(summary["dense"]) == [f"model.decoder.layers.{i}.fc2" for i in range(2)]
    assert isinstance(model.model.decoder.layers[0].fc1, SparseLinear)
    assert to_sparse_linears(pruned_tiny("llama", sparsity=0.5), min_sparsity=0.6)["converted"] == 0
    assert to_sparse_linears(tiny_model("llama"))["converted"] == 0  # dense: nothing to gain
    assert to_sparse_linears(pruned_tiny("llama", torch.float16))["converted"] == 0  # the kernel has no fp16
    with pytest.raises(SecateursError, match="min_sparsity"):
        to_sparse_linears(tiny_model("llama"), min_sparsity=1.5)


# ----------------------------------------------------------------------------------------- load_sparse
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_load_sparse_from_checkpoint(tmp_path, family):
    model = pruned_tiny(family)
    save_sparse(model, None, tmp_path / "s", progress=False)
    sparse, tokenizer = load_sparse(tmp_path / "s", threads=1)
    packed = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    assert len(packed) == len(decoder_linears(model))
    assert all(not hasattr(m, "weight") for m in packed)  # no dense copy anywhere
    assert timing.weight_bytes(sparse) < 0.7 * timing.weight_bytes(model)
    assert not any(t.device.type == "meta" for t in [*sparse.parameters(), *sparse.buffers()])
    if model.config.tie_word_embeddings:
        assert sparse.get_output_embeddings().weight is sparse.get_input_embeddings().weight
    ids = torch.randint(0, VOCAB, (1, 8))
    dense, _ = load_pruned(tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(timing.generate(sparse, ids, 8), timing.generate(dense, ids, 8))


def test_load_sparse_dtype_threshold_and_hf_folder(tmp_path, tiny_model_dir):
    model, tokenizer, _ = secateurs.load_model(str(tiny_model_dir))
    secateurs.prune(model, secateurs.Recipe(method="magnitude", sparsity=0.6), progress=False)
    save_pruned(model, tokenizer, tmp_path / "hf")
    save_sparse(model, tokenizer, tmp_path / "s", progress=False)
    ids = tokenizer("In the beginning", return_tensors="pt").input_ids
    from_hf, tok = load_sparse(tmp_path / "hf")
    from_sparse, _ = load_sparse(tmp_path / "s")
    assert tok is not None
    assert torch.equal(timing.generate(from_hf, ids, 6), timing.generate(from_sparse, ids, 6))
    bf16, _ = load_sparse(tmp_path / "s", dtype="bfloat16")
    assert {m.packed.dtype for m in bf16.modules() if isinstance(m, SparseLinear)} == {torch.bfloat16}
    assert bf16.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(bf16(ids).logits.float(), model(ids).logits, atol=0.1, rtol=0.1)
    unpacked, _ = load_sparse(tmp_path / "s", min_sparsity=0.9)  # 60% < 90%: every linear back to dense
    assert not any(isinstance(m, SparseLinear) for m in unpacked.modules())
    assert_bit_identical(unpacked, model)


def test_sparse_model_survives_dtype_change():
    model = pruned_tiny("opt")
    to_sparse_linears(model)
    model.to(torch.bfloat16)  # biases follow; packed values stay fp32 and the kernel takes bf16 activations
    with torch.no_grad():
        assert model(torch.randint(0, VOCAB, (1, 6))).logits.dtype == torch.bfloat16


def test_sparsify_is_a_deprecated_alias():
    model = pruned_tiny("llama")
    with pytest.warns(DeprecationWarning, match="to_sparse_linears"):
        summary = sparsify(model)
    assert summary["converted"] == len(decoder_linears(pruned_tiny("llama")))
    assert secateurs.sparsify is sparsify and secateurs.to_sparse_linears is to_sparse_linears


# ------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_smollm2_sparse_greedy_equals_dense_masked(tmp_path, sparsity):
    torch.set_num_threads(2)
    model, tokenizer, _ = secateurs.load_model("smollm2-135m")
    secateurs.prune(model, secateurs.Recipe(method="magnitude", sparsity=sparsity), progress=False)
    save_sparse(model, tokenizer, tmp_path / "s", progress=False)
    sparse, tok = load_sparse(tmp_path / "s")
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == 210
    ids = tok("The Lord is my shepherd; I shall not", return_tensors="pt").input_ids
    want = timing.generate(model, ids, 20)
    got = timing.generate(sparse, ids, 20)
    assert torch.equal(got, want), (tok.decode(got[0]), tok.decode(want[0]))
    back, _ = load_pruned(tmp_path / "s")
    assert_bit_identical(model, back)


# ------------------------------------------------------------------------------------------- int8 values
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_int8_checkpoint_round_trip(tmp_path, family):
    """save_sparse(values="int8"): int8 codes + per-row scales on disk; load_pruned gives the dequantised weights
    with the same zeros; load_sparse runs them on the kernel with the same outputs; int8 of an int8 folder is
    the same codes again."""
    from safetensors import safe_open

    from secateurs.format.sparse import WEIGHTS_NAME

    model = pruned_tiny(family)
    f32 = save_sparse(model, None, tmp_path / "f32", progress=False)
    i8 = save_sparse(model, None, tmp_path / "i8", progress=False, values="int8")
    assert i8["values"] == "int8" and i8["linear_checkpoint_bytes"] < 0.5 * f32["linear_checkpoint_bytes"]
    with safe_open(tmp_path / "i8" / WEIGHTS_NAME, "pt") as f:
        keys = list(f.keys())
        first = next(k for k in keys if k.endswith(".values"))
        assert f.get_tensor(first).dtype == torch.int8 and first.replace(".values", ".scales") in keys
    dense, _ = load_pruned(tmp_path / "i8")
    for name, module in decoder_linears(model).items():
        W0, W1 = weight_view(module), weight_view(dense.get_submodule(name))
        assert torch.equal(W0 == 0, W1 == 0), name  # same zeros: the mask survives quantisation
        scale = W0.abs().amax(1, keepdim=True) / 127
        assert bool(((W1 - W0).abs() <= scale + 1e-8).all()), name
    fast, _ = load_sparse(tmp_path / "i8", threads=1)
    assert {m.packed.dtype for m in fast.modules() if isinstance(m, SparseLinear)} == {torch.int8}
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)
        close = model(ids).logits
    torch.testing.assert_close(dense(ids).logits, close, atol=0.05, rtol=0.05)  # near the unquantised model
    from secateurs.checkpoint import compress

    compress(tmp_path / "i8", tmp_path / "again", values="int8", progress=False)
    again, _ = load_pruned(tmp_path / "again")
    a, b = again.state_dict(), dense.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compress_values_int8_cli_and_errors(tmp_path, tiny_model_dir):
    from conftest import run_main

    model, tokenizer, _ = secateurs.load_model(str(tiny_model_dir))
    secateurs.prune(model, secateurs.Recipe(method="magnitude", sparsity=0.7), progress=False)
    save_pruned(model, tokenizer, tmp_path / "hf")
    code, out, err = run_main("compress", tmp_path / "hf", "-o", tmp_path / "i8", "--values", "int8", "--json")
    assert code == 0, err
    assert json.loads(out)["values"] == "int8"
    code, _, err = run_main("compress", tmp_path / "i8", "-o", tmp_path / "x")
    assert code == 2 and "already a sparse checkpoint (add --values int8" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    code, _, err = run_main("compress", tmp_path / "hf", "-o", tmp_path / "busy", "--values", "int8")
    assert code == 2 and "busy" in err and (tmp_path / "busy" / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------- int8 LM head
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_int8_head(family):
    """The head runs int8 on the kernel; a plain tied embedding becomes int8 rows over the very same codes (held
    once); an embedding class of its own (Gemma's scaled one) keeps its weight; logits stay close."""
    from secateurs.runtime.linear import Int8Embedding, int8_head

    model = pruned_tiny(family)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
    W = model.get_output_embeddings().weight.detach().clone()
    held, per_step = timing.weight_bytes(model), timing.step_bytes(model)
    info = int8_head(model)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, SparseLinear) and head.packed.dtype == torch.int8
    scale = W.abs().amax(1, keepdim=True) / 127
    err = (head.dense_weight() - W).abs()
    assert bool(((err <= scale / 2 + 1e-7) | (W.abs() < scale / 2)).all())  # round to nearest (tiny ones to ±1)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=0.02, rtol=0.02)
    table = W.numel() * W.element_size()
    if family == "gpt2":  # tied plain embedding: codes shared with the head's packed values
        assert isinstance(embedding, Int8Embedding) and info["embedding"] == "int8, shared with the head"
        assert embedding.codes.data_ptr() == head.packed.values.data_ptr()
        ref = torch.nn.functional.embedding(ids, head.dense_weight())
        torch.testing.assert_close(embedding(ids), ref, rtol=0, atol=0)
        assert timing.weight_bytes(model) < held - 0.6 * table  # held once, 1 byte a weight + per-row overhead
    elif family == "gemma3":
        assert not isinstance(embedding, Int8Embedding) and info["embedding"].startswith("kept")
    else:
        assert info["embedding"] == "separate" and not isinstance(embedding, Int8Embedding)
    assert timing.step_bytes(model) < per_step - 0.6 * table  # the head is read in int8 each step
    with pytest.raises(SecateursError, match="already on the sparse kernel"):
        int8_head(model)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_kernel_head_keeps_the_weights_and_shares_a_tied_table(family):
    """``kernel_head`` puts the head on the kernel as it is (every weight stored, the dense path): the weight is
    bit-identical, logits equal the dense model's to fp32 accumulation error, and a plain tied embedding reads the
    very same memory (held once: only the mask and row offsets are added)."""
    from secateurs.runtime.linear import kernel_head

    model = pruned_tiny(family)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
        embedded = model.get_input_embeddings()(ids)
    W = model.get_output_embeddings().weight.detach().clone()
    held = timing.weight_bytes(model)
    info = kernel_head(model)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, SparseLinear) and head.packed.full and head.packed.dtype == W.dtype
    assert torch.equal(head.dense_weight(), W)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(ids[:, :1]).logits, before[:, :1], rtol=1e-5, atol=1e-5)  # decode: kernel
        assert torch.equal(model.get_input_embeddings()(ids), embedded)
    if family == "gpt2":  # tied plain embedding: the head's packed values are the table
        assert info["embedding"] == "shared with the head"
        assert embedding.weight.data_ptr() == head.packed.values.data_ptr()
        extra = W.numel() / 8 + 8 * (W.shape[0] + 1) + kernels.PAD_VALUES * W.element_size()
        assert timing.weight_bytes(model) <= held + extra
    elif family == "gemma3":
        assert info["embedding"].startswith("kept")
    else:
        assert info["embedding"] == "separate"
    with pytest.raises(SecateursError, match="already on the sparse kernel"):
        kernel_head(model)
    with pytest.raises(SecateursError, match="int8 or None"):
        kernel_head(pruned_tiny("gpt2"), "int4")


def test_load_sparse_with_int8_head(tmp_path):
    model = pruned_tiny("gpt2")
    save_sparse(model, None, tmp_path / "s", progress=False)
    fast, _ = load_sparse(tmp_path / "s", head="int8")
    assert fast.get_output_embeddings().packed.dtype == torch.int8
    on_kernel, _ = load_sparse(tmp_path / "s", head="kernel")
    assert on_kernel.get_output_embeddings().packed.full
    with torch.no_grad():
        ids = torch.randint(0, VOCAB, (1, 6))
        torch.testing.assert_close(on_kernel(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, model(ids).logits, atol=0.02, rtol=0.02)
    with pytest.raises(SecateursError, match="head must be one of kernel, int8"):
        load_sparse(tmp_path / "s", head="int4")


def test_int8_folder_loaded_in_another_dtype_keeps_its_codes(tmp_path):
    """dtype= converts the dense tensors and float values; int8 codes stay codes with their scales."""
    model = pruned_tiny("llama")
    save_sparse(model, None, tmp_path / "i8", progress=False, values="int8")
    reference, _ = load_pruned(tmp_path / "i8")
    bf16, _ = load_pruned(tmp_path / "i8", dtype="bfloat16")
    for name, module in decoder_linears(reference).items():
        W = weight_view(bf16.get_submodule(name))
        assert W.dtype == torch.bfloat16
        torch.testing.assert_close(W.float(), weight_view(module), rtol=1e-2, atol=1e-6)
    fast, _ = load_sparse(tmp_path / "i8", dtype="bfloat16")
    assert {m.packed.dtype for m in fast.modules() if isinstance(m, SparseLinear)} == {torch.int8}
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits.float(), reference(ids).logits, atol=0.1, rtol=0.1)


def test_int8_sizes_compare_with_the_dtype_they_replace(tmp_path):
    model = pruned_tiny("llama")
    f32 = save_sparse(model, None, tmp_path / "a", progress=False, values="int8")
    bf16 = save_sparse(model.to(torch.bfloat16), None, tmp_path / "b", progress=False, values="int8")
    assert f32["linear_checkpoint_bytes"] == bf16["linear_checkpoint_bytes"]  # the same codes and scales
    assert f32["linear_dense_bytes"] == 2 * bf16["linear_dense_bytes"]  # against 4 and 2 bytes a weight
