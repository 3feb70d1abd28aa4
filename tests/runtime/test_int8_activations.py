"""int8 activations: inputs quantised to int8 per group of 64, multiplied with int8 codes by VNNI dot products."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_main

import secateurs
from secateurs.checkpoint import save_sparse
from secateurs.errors import SecateursError
from secateurs.runtime import kernels
from secateurs.runtime.decode import LeanDecoder
from secateurs.runtime.fused import fuse_shared_inputs
from secateurs.runtime.linear import kernel_head, load_sparse, use_int8_activations
from secateurs.runtime.modules import SparseLinear

ISAS = kernels.supported_isas()
needs_vnni = pytest.mark.skipif(not kernels.vnni_available(), reason="no AVX-512 VNNI kernel on this machine")


@pytest.fixture(autouse=True)
def _restore_kernel_settings():
    yield
    kernels.set_isa(None)
    kernels.set_num_threads(None)


def weight(out: int, cols: int, density: float, seed: int = 0) -> torch.Tensor:
    """Random weight with about ``density`` stored; row 1 empty, column 0 empty, when there is room."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=gen)
    if density < 1:
        w[torch.rand(out, cols, generator=gen) >= density] = 0.0
        if out > 2:
            w[1] = 0.0
        if cols > 2:
            w[:, 0] = 0.0
    return w


def truth(x: torch.Tensor, p: kernels.PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """float64: the quantised x (its codes times its scales) times the dequantised weight."""
    codes, scales = kernels.quantize_inputs(x)
    groups = scales.shape[-1]
    xd = (codes.double().reshape(*scales.shape, 64) * scales.double().unsqueeze(-1)).reshape(*x.shape[:-1], groups * 64)
    y = xd[..., : x.shape[-1]] @ kernels.unpack(p).double().T
    return y if bias is None else y + bias.double()


def test_quantize_inputs_by_hand():
    x = torch.zeros(1, 70)
    x[0, :4] = torch.tensor([2.54, -1.27, 0.01, 0.03])  # group 0: max 2.54, scale 0.02
    x[0, 64] = -0.5  # group 1 (6 inputs, padded to 64): max 0.5
    codes, scales = kernels.quantize_inputs(x)
    assert codes.shape == (1, 128) and codes.dtype == torch.int8 and scales.shape == (1, 2)
    assert scales[0].tolist() == pytest.approx([0.02, 0.5 / 127])
    # 2.54 * 127 / 2.54 = 127; -1.27 -> -63.5 -> -64 (half to even); 0.01 -> 0.5 -> 0; 0.03 -> 1.5 -> 2
    assert codes[0, :5].tolist() == [127, -64, 0, 2, 0]
    assert codes[0, 64].item() == -127 and not codes[0, 65:].any()
    zero_codes, zero_scales = kernels.quantize_inputs(torch.zeros(2, 64))
    assert not zero_codes.any() and not zero_scales.any()
    assert torch.equal(kernels.fake_quantize_inputs(x)[0, :4], torch.tensor([127, -64, 0, 2]) * scales[0, 0])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(37, 130), (21, 64), (5, 65), (9, 3), (16, 576), (3, 129)])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_int8_inputs_match_float64_truth(isa, shape, density):
    """Every path (VNNI where present; the float kernels and torch take the quantised inputs) against float64 truth
    of quantised x times the dequantised weight: odd widths, an empty row and column, decode and many tokens,
    float32 and bfloat16 x, with and without bias; a full weight (an int8 head) reads its codes in place."""
    kernels.set_isa(isa)
    out, cols = shape
    p = kernels.pack(weight(out, cols, density, seed=cols), "int8")
    assert p.full == (density == 1.0)
    for m in (1, 2, 4, 5, 9):
        x = torch.randn(m, cols) * torch.linspace(0.1, 4, cols)
        for bias in (None, torch.randn(out)):
            y = kernels.spmm(x, p, bias, int8_inputs=True)
            t = truth(x, p, bias)
            assert y.dtype == torch.float32
            assert torch.allclose(y.double(), t, rtol=1e-5, atol=1e-5 * t.abs().max().item()), (m, bias is None)
            if density < 1 and out > 2:  # the empty row: exactly the bias (each lane's integer sum is exact)
                assert torch.equal(y[:, 1], torch.zeros(m) if bias is None else bias.expand(m, -1)[:, 1])
            xb = x.bfloat16()
            yb = kernels.spmm(xb, p, bias, int8_inputs=True)
            tb = truth(xb, p, bias)
            # the fp32 sums rounded once to bfloat16
            assert yb.dtype == torch.bfloat16
            assert torch.allclose(yb.double(), tb, rtol=2**-8, atol=1e-5 * tb.abs().max().item())


@needs_vnni
def test_vnni_equals_the_float_kernel_on_the_same_quantised_inputs():
    """The integer path and the float kernel fed the quantised x agree to fp32 rounding, for shapes of a model."""
    for out, cols in ((1536, 576), (576, 1536), (100, 1000)):
        p = kernels.pack(weight(out, cols, 0.3), "int8")
        x = torch.randn(3, 1, cols)
        y = kernels.spmm(x, p, int8_inputs=True)
        assert y.shape == (3, 1, out)
        kernels.set_isa("scalar")
        y_float = kernels.spmm(x, p, int8_inputs=True)
        kernels.set_isa(None)
        assert torch.allclose(y, y_float, rtol=1e-5, atol=1e-4)
        # strided x (a view) is read through its stride
        wide = torch.randn(2, cols + 7)
        assert torch.allclose(
            kernels.spmm(wide[:, :cols], p, int8_inputs=True),
            truth(wide[:, :cols], p, None).float(),
            rtol=1e-5,
            atol=1e-4,
        )


def test_int8_inputs_refused_for_float_values_and_the_column_layout():
    x = torch.randn(1, 20)
    with pytest.raises(ValueError, match="int8 values in the row layout"):
        kernels.spmm(x, kernels.pack(weight(4, 20, 0.5)), int8_inputs=True)
    columns = kernels.to_layout(kernels.pack(weight(4, 20, 0.5), "int8"), "columns")
    with pytest.raises(ValueError, match="int8 values in the row layout"):
        kernels.spmm(x, columns, int8_inputs=True)


@pytest.fixture
def int8_folder(tmp_path, tiny_model_dir):
    """The tiny LLaMA pruned 60% by magnitude, as a sparse checkpoint with int8 values."""
    model, tokenizer, _ = secateurs.load_model(str(tiny_model_dir))
    secateurs.prune(model, secateurs.Recipe(method="magnitude", sparsity=0.6), progress=False)
    save_sparse(model, tokenizer, tmp_path / "i8", progress=False, values="int8")
    return tmp_path / "i8"


def test_model_linears_take_quantised_inputs(int8_folder):
    """In a model (an int8 head too, and grouped linears): every kernel linear's output equals the pure-torch
    restatement on the input it received; switching off restores the float product."""
    model, tokenizer = load_sparse(int8_folder, fuse=False)
    kernel_head(model, "int8")
    summary = use_int8_activations(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert summary["linears"] == len(linears) and all(m.int8_inputs for m in linears.values())
    assert "int8 inputs" in repr(model.lm_head)
    fuse_shared_inputs(model)
    assert any(m.shared is not None for m in linears.values())
    seen = []

    def check(module, args, output):
        r = kernels.spmm_reference(args[0], module.packed, module.bias, None, True)
        seen.append(bool(torch.allclose(output, r, rtol=1e-5, atol=1e-5)))

    handles = [m.register_forward_hook(check) for m in linears.values()]
    ids = torch.randint(0, 200, (1, 7))
    with torch.inference_mode():
        quantised = model(ids).logits
    for h in handles:
        h.remove()
    assert len(seen) == len(linears) and all(seen)
    use_int8_activations(model, enable=False)
    with torch.inference_mode():
        plain = model(ids).logits
    assert not torch.equal(plain, quantised)
    assert torch.allclose(plain, quantised, atol=0.1 * plain.abs().max().item())


def test_lean_decoder_and_load_sparse_with_int8_activations(int8_folder):
    model, _ = load_sparse(int8_folder, head="int8", int8_activations=True)
    assert all(m.int8_inputs for m in model.modules() if isinstance(m, SparseLinear))
    ids = torch.randint(0, 200, (1, 5))
    decoder = LeanDecoder(model, 16)
    tokens = decoder.generate(ids, 4)
    with torch.inference_mode():  # the same greedy tokens through transformers' own forward
        own = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)[:, 5:]
    assert tokens.shape == (1, 4) and torch.equal(tokens, own)


def test_use_int8_activations_needs_int8_values(tmp_path, tiny_model_dir):
    model, _ = load_sparse(tiny_model_dir, min_sparsity=0.0)
    with pytest.raises(SecateursError, match="int8 values"):
        use_int8_activations(model)


def test_cli_bench_with_int8_activations(int8_folder):
    args = ["--tokens", "3", "--prompt-len", "4", "--repeat", "1", "--threads", "1", "--quiet", "--no-micro"]
    code, out, err = run_main("bench", str(int8_folder), *args, "--json", "--head", "int8", "--int8-activations")
    assert code == 0, err
    result = json.loads(out)
    assert result["int8_activations"] == ("vnni" if kernels.vnni_available() else "float kernel")
    code, out, err = run_main("bench", str(int8_folder), *args, "--int8-activations")
    assert code == 0 and "int8 activations" in out, err
