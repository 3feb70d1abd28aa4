"""The packed sparse weight format and its matmul: every path (AVX-512, AVX2, scalar, torch) against float64 truth."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secateurs.runtime import kernels

DTYPES = [torch.float32, torch.bfloat16]
ISAS = kernels.supported_isas()  # best first, "torch" always last
NATIVE = [name for name in ISAS if name != "torch"]
SPARSITIES = [0.0, 0.5, 0.7, 0.9, 0.99, 1.0]
needs_native = pytest.mark.skipif(not kernels.native_available(), reason="the compiled kernel is not built")


@pytest.fixture(autouse=True)
def _restore_kernel_settings():
    yield
    kernels.set_isa(None)
    kernels.set_num_threads(None)
    kernels.set_prefill_rows(None)
    kernels.set_outer_rows(None)


def sparse_weight(out: int, cols: int, sparsity: float, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A random weight with about ``sparsity`` of it zero; one empty and one full row when there is room."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, cols, generator=gen)
    weight[torch.rand(out, cols, generator=gen) < sparsity] = 0.0
    if out >= 3:
        weight[1] = 0.0
        weight[2] = torch.randn(cols, generator=gen)
    return weight.to(dtype)


def assert_close_to_truth(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """y within fp32 accumulation error (scaled by sum |x||w|) plus one rounding to y's dtype of float64 truth."""
    xd, wd = x.double(), weight.double()
    truth = xd @ wd.T + (0 if bias is None else bias.double())
    scale = xd.abs() @ wd.abs().T + (0 if bias is None else bias.double().abs())
    ulp = 2.0**-8 if y.dtype == torch.bfloat16 else 2.0**-23
    tol = 1e-5 * scale + ulp * truth.abs() + 1e-30
    err = (y.double() - truth).abs()
    assert y.dtype == x.dtype and y.shape == truth.shape
    bad = err > tol
    assert not bool(bad.any()), f"{int(bad.sum())} entries off, worst error {err.max().item():.3g}"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    as_int = torch.int32 if a.dtype == torch.float32 else torch.int16
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(as_int), b.view(as_int))


# ---------------------------------------------------------------------------------------------- the format
@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(0, 40),
    cols=st.integers(0, 70),
    sparsity=st.sampled_from(SPARSITIES),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_is_bit_identical(out, cols, sparsity, dtype, seed):
    weight = sparse_weight(out, cols, sparsity, dtype, seed)
    if weight.numel():
        weight.view(-1)[seed % weight.numel()] = -0.0  # stored: its bit pattern is not zero
    p = kernels.pack(weight)
    assert p.shape == (out, cols) and p.dtype == dtype
    assert p.mask.shape == (out, (cols + 7) // 8) and p.mask.dtype == torch.uint8
    assert p.nnz == int((weight.view(torch.int32 if dtype == torch.float32 else torch.int16) != 0).sum())
    assert p.row_offsets[-1] == p.nnz and p.values.numel() >= p.nnz + 16
    assert same_bits(kernels.unpack(p), weight)
    again = kernels.from_parts(p.mask, p.values[: p.nnz].clone(), p.shape)
    assert torch.equal(again.row_offsets, p.row_offsets) and same_bits(kernels.unpack(again), weight)


def test_mask_layout_is_lsb_first():
    weight = torch.zeros(2, 10)
    weight[0, 0] = weight[0, 9] = weight[1, 3] = 1.0
    weight[1, 8] = -0.0
    p = kernels.pack(weight)
    assert p.mask.tolist() == [[0b00000001, 0b00000010], [0b00001000, 0b00000001]]
    assert p.row_offsets.tolist() == [0, 2, 4] and p.values[: p.nnz].tolist() == [1.0, 1.0, 1.0, -0.0]


@pytest.mark.parametrize(
    "weight, message",
    [
        (torch.zeros(4), "2-D"),
        (torch.zeros(2, 2, dtype=torch.float16), "float32 or bfloat16"),
        (torch.zeros(2, 2, dtype=torch.int32), "float32 or bfloat16"),
        ([[1.0]], "torch.Tensor"),
    ],
)
def test_pack_rejects_bad_weights(weight, message):
    with pytest.raises(ValueError, match=message):
        kernels.pack(weight)


def test_from_parts_rejects_inconsistent_parts():
    p = kernels.pack(sparse_weight(6, 13, 0.5))
    mask, values = p.mask, p.values[: p.nnz]
    cases = [
        ((mask.int(), values, (6, 13)), "mask dtype must be uint8"),
        ((mask[:5], values, (6, 13)), r"mask shape must be \(6, 2\)"),
        ((mask, values, (6, 17)), r"mask shape must be \(6, 3\)"),
        ((mask, values.half(), (6, 13)), "values dtype"),
        ((mask, values.view(1, -1), (6, 13)), "1-D"),
        ((mask, values[:-1], (6, 13)), f"marks {p.nnz} stored weights but values holds {p.nnz - 1}"),
        ((mask, torch.cat([values, torch.zeros(3)]), (6, 13)), "values holds"),
        ((mask, values, (6,)), "two integers"),
        ((mask, values, (-6, 13)), "non-negative"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            kernels.from_parts(*args)
    stray = mask.clone()
    stray[0, 1] |= 0b10000000  # column 15 of a 13-column row
    with pytest.raises(ValueError, match="bits set past column 13"):
        kernels.from_parts(stray, values, (6, 13))


# ---------------------------------------------------------------------------------------------- the product
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    out=st.integers(1, 48),
    cols=st.one_of(st.integers(1, 70), st.sampled_from([96, 576])),
    sparsity=st.sampled_from(SPARSITIES),
    batch=st.one_of(st.integers(0, 9), st.sampled_from([17, 37])),
    wdtype=st.sampled_from(DTYPES),
    xdtype=st.sampled_from(DTYPES),
    with_bias=st.booleans(),
    isa=st.sampled_from(ISAS),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_spmm_matches_dense(out, cols, sparsity, batch, wdtype, xdtype, with_bias, isa, threads, seed):
    kernels.set_isa(isa)
    kernels.set_num_threads(threads)
    weight = sparse_weight(out, cols, sparsity, wdtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, cols, generator=gen).to(xdtype)
    bias = torch.randn(out, generator=gen).to(wdtype) if with_bias else None
    assert_close_to_truth(kernels.spmm(x, kernels.pack(weight), bias), x, weight, bias)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cols", [1, 7, 8, 15, 16, 17, 33, 576])
def test_awkward_widths(isa, cols):
    """Widths around the 8- and 16-column chunks, all sparsities, decode and prefill batches, both dtypes."""
    kernels.set_isa(isa)
    for sparsity in SPARSITIES:
        for dtype in DTYPES:
            weight = sparse_weight(21, cols, sparsity, dtype, seed=cols)
            p = kernels.pack(weight)
            for batch in (1, 2, 3, 4, 5, 8, 37):
                x = torch.randn(batch, cols).to(dtype)
                assert_close_to_truth(kernels.spmm(x, p), x, weight, None)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_model_shapes_threads_and_prefill(isa, threads):
    """SmolLM2-135M's MLP shape at 70%, large enough that the work is split across threads."""
    kernels.set_isa(isa)
    kernels.set_num_threads(threads)
    for dtype in DTYPES:
        weight = sparse_weight(1536, 576, 0.7, dtype)
        p = kernels.pack(weight)
        bias = torch.randn(1536).to(dtype)
        for batch in (1, 8, 128):
            x = torch.randn(batch, 576).to(dtype)
            assert_close_to_truth(kernels.spmm(x, p, bias), x, weight, bias)


@pytest.mark.parametrize("isa", ISAS)
def test_empty_full_and_negative_zero_rows(isa):
    kernels.set_isa(isa)
    weight = sparse_weight(8, 40, 0.6)
    weight[0] = 0.0
    weight[3] = -0.0
    weight[5] = torch.randn(40)
    weight[6, ::3] = -0.0
    bias = torch.arange(8.0)
    x = torch.randn(5, 40)
    y = kernels.spmm(x, kernels.pack(weight), bias)
    assert_close_to_truth(y, x, weight, bias)
    assert torch.equal(y[:, 0], bias[0].expand(5)) and torch.equal(y[:, 3], bias[3].expand(5))
    assert torch.equal(kernels.spmm(x, kernels.pack(torch.zeros(4, 40))), torch.zeros(5, 4))


@pytest.mark.parametrize("isa", ISAS)
def test_leading_dims_strides_and_empty_batches(isa):
    kernels.set_isa(isa)
    weight = sparse_weight(12, 24, 0.7)
    p = kernels.pack(weight)
    x = torch.randn(2, 3, 24)
    y = kernels.spmm(x, p)
    assert y.shape == (2, 3, 12)
    assert_close_to_truth(y.reshape(6, 12), x.reshape(6, 24), weight, None)
    wide = torch.randn(5, 48)[:, ::2]  # inner stride 2: copied
    assert_close_to_truth(kernels.spmm(wide, p), wide, weight, None)
    rows = torch.randn(10, 24)[::2]  # row stride 48: read in place
    assert_close_to_truth(kernels.spmm(rows, p), rows, weight, None)
    transposed = torch.randn(24, 4).T
    assert_close_to_truth(kernels.spmm(transposed, p), transposed, weight, None)
    assert kernels.spmm(torch.randn(0, 24), p).shape == (0, 12)
    assert kernels.spmm(torch.randn(2, 0, 24, dtype=torch.bfloat16), p).shape == (2, 0, 12)
    bias = torch.randn(3)
    empty = kernels.pack(torch.zeros(3, 0))
    assert torch.equal(kernels.spmm(torch.randn(4, 0), empty, bias), bias.expand(4, 3))


def test_spmm_rejects_bad_input():
    p = kernels.pack(sparse_weight(4, 8, 0.5))
    with pytest.raises(ValueError, match="last dimension must be 8"):
        kernels.spmm(torch.randn(2, 7), p)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kernels.spmm(torch.randn(2, 8).half(), p)
    with pytest.raises(ValueError, match="bias"):
        kernels.spmm(torch.randn(2, 8), p, torch.randn(5))


@needs_native
def test_simd_paths_agree_with_scalar():
    """Different summation orders only: the paths agree far more closely than with the bf16 truth tolerance."""
    weight = sparse_weight(64, 200, 0.7)
    x = torch.randn(11, 200)
    p = kernels.pack(weight)
    results = {}
    for isa in NATIVE:
        kernels.set_isa(isa)
        results[isa] = kernels.spmm(x, p)
    for isa, y in results.items():
        torch.testing.assert_close(y, results["scalar"], rtol=1e-5, atol=1e-5, msg=isa)


@needs_native
def test_concurrent_callers():
    """Python threads calling at once (the GIL is released): one uses the pool, the others run on their own."""
    kernels.set_num_threads(2)
    weight = sparse_weight(1536, 576, 0.7)
    p = kernels.pack(weight)
    x = torch.randn(8, 576)
    expected = kernels.spmm(x, p)
    failures = []

    def work():
        for _ in range(30):
            if not torch.equal(kernels.spmm(x, p), expected):
                failures.append(1)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


# ---------------------------------------------------------------------------------------------- ISA selection
def test_isa_selection():
    assert kernels.isa() == ISAS[0]
    assert kernels.native_available() == (ISAS != ["torch"])
    kernels.set_isa("torch")
    assert kernels.isa() == "torch"
    kernels.set_isa(None)
    assert kernels.isa() == ISAS[0]
    with pytest.raises(ValueError, match="unknown kernel ISA 'sse9'"):
        kernels.set_isa("sse9")
    for name in {"avx512", "avx2", "scalar"} - set(ISAS):
        with pytest.raises(ValueError, match="not available"):
            kernels.set_isa(name)
    with pytest.raises(ValueError, match="positive integer"):
        kernels.set_num_threads(0)


def _import_with_env(value: str) -> subprocess.CompletedProcess:
    code = "from secateurs.runtime import kernels; print(kernels.isa())"
    env = {**os.environ, kernels.ISA_ENV: value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_isa_environment_variable():
    done = _import_with_env("torch")
    assert done.returncode == 0 and done.stdout.strip() == "torch"
    done = _import_with_env("sse9")
    assert done.returncode != 0 and "SECATEURS_KERNEL_ISA" in done.stderr and "unknown kernel ISA" in done.stderr


# ------------------------------------------------------------------------------------------------ int8 values
def test_quantize_rows_by_hand():
    W = torch.tensor([[1.27, -0.5, 0.0, 0.001], [0.0, 0.0, 0.0, 0.0], [-2.54, 0.0, -0.0, 0.02]])
    stored = W.view(torch.int32) != 0
    q, scales = kernels.quantize_rows(W, stored)
    assert torch.allclose(scales, torch.tensor([0.01, 1.0, 0.02]))
    # 1.27/0.01 = 127, -0.5/0.01 = -50, 0.001/0.01 rounds to 0 but is stored: +1; empty row scale 1, codes 0;
    # -0.0 is stored (bit pattern) yet zero: stays 0
    assert q.tolist() == [[127, -50, 0, 1], [0, 0, 0, 0], [-127, 0, 0, 1]]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cols", [1, 7, 16, 17, 33, 576])
def test_int8_values_match_their_dequantised_weight(isa, cols):
    """int8 codes times per-row scales, on every path, against float64 truth of the dequantised weight; the mask
    (every stored weight) is unchanged by quantisation."""
    kernels.set_isa(isa)
    for sparsity in SPARSITIES:
        weight = sparse_weight(21, cols, sparsity, seed=cols)
        p = kernels.pack(weight, "int8")
        assert p.values.dtype == torch.int8 and p.scales.shape == (21,)
        dequantised = kernels.unpack(p)
        assert torch.equal(dequantised != 0, weight != 0)
        if weight.any():
            scale = weight.abs().amax(1, keepdim=True)
            assert bool(
                ((dequantised - weight).abs() <= scale / 127 * 0.5 + 1e-7).logical_or(weight.abs() < scale / 254).all()
            )
        for batch in (1, 4, 5, 37):
            x = torch.randn(batch, cols)
            bias = torch.randn(21)
            assert_close_to_truth(kernels.spmm(x, p, bias), x, dequantised, bias)
            xb = x.bfloat16()
            # many bf16 rows may take the tiled path, which multiplies in bf16 (the weight rounded to bf16 first);
            # outer products multiply the codes exactly and scale the sums
            tiled = batch >= kernels.prefill_rows(torch.int8, p.density) and isa != "torch"
            assert_close_to_truth(kernels.spmm(xb, p), xb, dequantised.bfloat16() if tiled else dequantised, None)


def test_int8_from_parts_checks_scales():
    p = kernels.pack(sparse_weight(6, 13, 0.5), "int8")
    mask, values = p.mask, p.values[: p.nnz]
    again = kernels.from_parts(mask, values, (6, 13), p.scales)
    assert torch.equal(kernels.unpack(again), kernels.unpack(p))
    for scales, message in (
        (None, "need per-row scales"),
        (p.scales[:5], r"shape \(6,\)"),
        (p.scales.double(), "float32"),
        (torch.full((6,), float("nan")), "finite"),
    ):
        with pytest.raises(ValueError, match=message):
            kernels.from_parts(mask, values, (6, 13), scales)
    with pytest.raises(ValueError, match="only they have scales"):
        kernels.from_parts(mask, values.float(), (6, 13), p.scales)
    with pytest.raises(ValueError, match="values must be int8"):
        kernels.pack(sparse_weight(6, 13, 0.5), "int4")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("values", ["float32", "bfloat16", "int8"])
def test_one_token_path_on_every_width(isa, values):
    """One token (decode) takes a path of its own (a row at a time, four accumulators over groups of chunks,
    prefetching ahead): every width from 0 to 9 whole chunks plus every remainder kind, sparse and full rows,
    against float64 truth; a 2-token call over the same weight agrees (the block path)."""
    kernels.set_isa(isa)
    dtype = torch.bfloat16 if values == "bfloat16" else torch.float32
    for chunks in range(10):
        for extra in (0, 1, 5, 8, 9, 15):
            cols = 16 * chunks + extra
            if cols == 0:
                continue
            for sparsity in (0.0, 0.7):
                weight = sparse_weight(11, cols, sparsity, dtype, seed=cols)
                p = kernels.pack(weight, "int8" if values == "int8" else None)
                held, bias = kernels.unpack(p), torch.randn(11)
                x = torch.randn(2, cols)
                one = kernels.spmm(x[:1], p, bias)
                assert_close_to_truth(one, x[:1], held, bias)
                torch.testing.assert_close(one, kernels.spmm(x, p, bias)[:1], rtol=1e-5, atol=1e-5)


def test_a_deep_copy_holds_its_own_memory():
    """copy.deepcopy of a packed weight (and so of a model on the kernel) multiplies from its own tensors: the
    original may be freed."""
    import copy
    import gc

    weight = sparse_weight(9, 33, 0.6)
    for values in (None, "int8"):
        p = kernels.pack(weight, values)
        q = copy.deepcopy(p)
        assert q.values.data_ptr() != p.values.data_ptr() and q._args[1] == q.values.data_ptr()
        assert all(a != b for a, b in zip(q._args[:4:3], p._args[:4:3], strict=True))
        want = kernels.spmm(torch.ones(1, 33), p)
        del p
        gc.collect()
        assert torch.equal(kernels.spmm(torch.ones(1, 33), q), want)


# ------------------------------------------------------------------------------ every weight stored (dense)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("values", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("out, cols", [(1, 1), (5, 7), (9, 16), (13, 17), (21, 33), (6, 576)])
def test_full_weights_take_the_dense_path_and_match_truth(isa, values, out, cols, monkeypatch):
    """A weight with every entry stored (an LM head on the kernel) is flagged full; the kernel's dense path (no mask
    read) matches float64 truth for 1-7 tokens on every ISA and thread count, and from DENSE_PREFILL_ROWS rows the
    float values are multiplied in place, never decompressed."""
    kernels.set_isa(isa)
    dtype = torch.bfloat16 if values == "bfloat16" else torch.float32
    weight = torch.randn(out, cols, generator=torch.Generator().manual_seed(out * cols)).to(dtype)
    weight[weight == 0] = 1.0
    p = kernels.pack(weight, "int8" if values == "int8" else None)
    assert p.full and not kernels.pack(sparse_weight(out + 3, cols, 0.5)).full
    if values != "int8":  # the same weight held in its own memory (when its rows are whole 16-value vectors)
        p = kernels.pack_full(weight)
        assert p.full and (p.values.data_ptr() == weight.data_ptr()) == (cols % 16 == 0)
        assert same_bits(kernels.unpack(p), weight)
    held = kernels.unpack(p)
    bias = torch.randn(out)
    for threads in (1, 2, 3):
        kernels.set_num_threads(threads)
        for batch in range(1, kernels.DENSE_PREFILL_ROWS):
            for xdtype in DTYPES:
                x = torch.randn(batch, cols).to(xdtype)
                assert_close_to_truth(kernels.spmm(x, p, bias), x, held, bias)
    if values != "int8":

        def never(*args, **kwargs):
            raise AssertionError("a full float weight is never decompressed")

        monkeypatch.setattr(kernels, "unpack_rows", never)
    x = torch.randn(2, 9, cols)
    y = kernels.spmm(x, p, bias)
    assert_close_to_truth(y.reshape(-1, out), x.reshape(-1, cols), held.float(), bias)


# ------------------------------------------------------------------------------------- tiled prefill path
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("values", ["float32", "bfloat16", "int8"])
def test_unpack_rows_equals_unpack(isa, values):
    kernels.set_isa(isa)
    for cols in (1, 7, 8, 15, 16, 17, 33, 130):
        weight = sparse_weight(13, cols, 0.6, torch.bfloat16 if values == "bfloat16" else torch.float32, seed=cols)
        p = kernels.pack(weight, "int8" if values == "int8" else None)
        whole = kernels.unpack(p)
        for r0, r1 in ((0, 13), (2, 9), (5, 5), (12, 13)):
            part = kernels.unpack_rows(p, r0, r1)
            assert part.shape == (r1 - r0, cols) and same_bits(part, whole[r0:r1].to(part.dtype))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("values", ["float32", "bfloat16", "int8"])
def test_tiled_prefill_matches_truth(isa, values, monkeypatch):
    """Many rows of x take the tiled path (decompress a tile of rows, dense matmul): several tiles, a partial last
    one, leading dims and a bias, against float64 truth of the weight it holds."""
    kernels.set_isa(isa)
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 7 * 40)  # 7 rows a tile: 3 tiles of 7 and one of 1
    dtype = torch.bfloat16 if values == "bfloat16" else torch.float32
    weight = sparse_weight(22, 40, 0.7, dtype)
    p = kernels.pack(weight, "int8" if values == "int8" else None)
    held = kernels.unpack(p)
    bias = torch.randn(22).to(dtype)
    for xdtype in DTYPES:
        x = torch.randn(3, 50, 40).to(xdtype)
        kernels.set_prefill_rows(10**9)
        small = kernels.spmm(x[:, :1], p, bias)  # the kernel
        kernels.set_prefill_rows(8)
        y = kernels.spmm(x, p, bias)  # 150 rows: tiled
        assert y.shape == (3, 50, 22) and y.dtype == xdtype
        truth_x = x.reshape(-1, 40)
        if xdtype == torch.bfloat16 and values != "float32":  # a bf16 matmul, as the dense bf16 model's
            truth = truth_x.double() @ held.double().T + bias.double()
            assert torch.allclose(y.reshape(-1, 22).double(), truth, rtol=2e-2, atol=2e-2)
        else:  # in fp32, as the kernel
            assert_close_to_truth(y.reshape(-1, 22), truth_x, held, bias)
        torch.testing.assert_close(y[:, :1].float(), small.float(), rtol=2e-2, atol=2e-2)


def test_prefill_rows_setting():
    assert kernels.prefill_rows(torch.bfloat16) == kernels.PREFILL_ROWS[torch.bfloat16]
    kernels.set_prefill_rows(5)
    assert kernels.prefill_rows(torch.float32) == kernels.prefill_rows(torch.bfloat16) == 5
    with pytest.raises(ValueError, match="positive integer"):
        kernels.set_prefill_rows(0)
    kernels.set_prefill_rows(None)
    assert kernels.prefill_rows() == kernels.PREFILL_ROWS[torch.float32]
    p = kernels.pack(sparse_weight(4, 8, 0.5))
    with pytest.raises(ValueError, match="not within"):
        kernels.unpack_rows(p, 2, 9)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_unpack_rows_on_several_threads(threads):
    """The decompression splits rows over the kernel's pool: every range, from any first row, is exact."""
    kernels.set_num_threads(threads)
    for values in (None, "int8"):
        p = kernels.pack(sparse_weight(300, 200, 0.7, seed=threads), values)
        whole = kernels.unpack(p)
        for r0, r1 in ((0, 300), (17, 283), (299, 300)):
            assert same_bits(kernels.unpack_rows(p, r0, r1), whole[r0:r1])


# ----------------------------------------------------------------------------- outer products (AVX-512 prefill)
class NativeCalls:
    """The compiled module with the outer-product flag of each spmm call recorded."""

    def __init__(self, native):
        self.native, self.outer = native, []

    def __getattr__(self, name):
        return getattr(self.native, name)

    def spmm(self, *args):
        self.outer.append(args[-1])
        return self.native.spmm(*args)


@pytest.fixture
def native_calls(monkeypatch):
    spy = NativeCalls(kernels._native)
    monkeypatch.setattr(kernels, "_native", spy)
    return spy


# widths off the 16-column groups and the 128-column chunks (and odd for the bf16 pairs), odd row counts, and
# more rows than a block of 64
OUTER_SHAPES = [(1, 1), (5, 15), (33, 17), (19, 69), (70, 31), (9, 130), (130, 263)]


@needs_native
@pytest.mark.parametrize("values", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("out, cols", OUTER_SHAPES)
def test_outer_products_match_truth(values, out, cols, native_calls):
    """The AVX-512 kernel's outer products (forced from 1 token here) against float64 truth: an empty row, a full
    row, empty columns, a single token block and ragged ones (1-15 tokens in the last block of 16; 17, 33, 65 and
    513 tokens), fp32 and bf16 activations (bf16 with bf16 or int8 values: the bf16 pair form, half of the last pair
    past an odd width), a bias, 1 and 2 threads. The other ISAs ignore the flag and reach the same truth."""
    kernels.set_outer_rows(1)
    kernels.set_prefill_rows(kernels.NEVER)
    dtype = torch.bfloat16 if values == "bfloat16" else torch.float32
    weight = sparse_weight(out, cols, 0.6, dtype, seed=out * cols)  # row 1 empty and row 2 full where out >= 3
    if cols >= 4:
        weight[:, 3] = 0.0
        weight[:, cols - 1] = 0.0
    p = kernels.pack(weight, "int8" if values == "int8" else None)
    held = kernels.unpack(p)
    gen = torch.Generator().manual_seed(cols)
    bias = torch.randn(out, generator=gen)
    for isa in NATIVE:
        kernels.set_isa(isa)
        for threads in (1, 2):
            kernels.set_num_threads(threads)
            for batch in (1, 2, 15, 16, 17, 33, 64, 65, 513):
                x = torch.randn(batch, cols, generator=gen)
                for xdtype in DTYPES:
                    xd = x.to(xdtype)
                    assert_close_to_truth(kernels.spmm(xd, p, bias), xd, held, bias)
                    assert native_calls.outer[-1] == (isa == "avx512")


@needs_native
def test_outer_products_agree_with_the_inner_product_blocks(native_calls):
    """A model shape on 2 threads: the outer products and the inner-product blocks differ by summation order only."""
    kernels.set_num_threads(2)
    kernels.set_prefill_rows(kernels.NEVER)
    for values in (None, "int8"):
        for dtype in DTYPES:
            p = kernels.pack(sparse_weight(1536, 576, 0.7, dtype), values)
            x = torch.randn(100, 576).to(dtype)
            kernels.set_outer_rows(1)
            outer = kernels.spmm(x, p)
            kernels.set_outer_rows(kernels.NEVER)
            blocks = kernels.spmm(x, p)
            assert native_calls.outer[-2:] == [kernels.isa() == "avx512", False]
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(outer.float(), blocks.float(), rtol=tol, atol=tol)


@needs_native
def test_outer_products_dispatch(native_calls, monkeypatch):
    """By default on AVX-512, a row-layout weight takes outer products from OUTER_ROWS rows and tiles as
    OUTER_PREFILL_ROWS says for its density (by the dtype tiles would multiply in: fp32 sparse ones never, bf16
    ones never at 70%, from 128 rows at 50%, int8 codes never at 50%); denser ones, and full ones (which keep the
    kernel's dense path below), are tiled from PREFILL_ROWS; the column layout and the other ISAs keep the
    inner-product kernel and the tiles from PREFILL_ROWS."""
    tiled = []
    real = kernels._spmm_tiled

    def spy(x2, p, bias):
        tiled.append(x2.shape[0])
        return real(x2, p, bias)

    monkeypatch.setattr(kernels, "_spmm_tiled", spy)

    def path(x, p):
        tiled.clear()
        native_calls.outer.clear()
        kernels.spmm(x, p)
        return "tiled" if tiled else "outer" if native_calls.outer and native_calls.outer[-1] else "kernel"

    sparse = {dtype: kernels.pack(sparse_weight(40, 64, 0.7, dtype)) for dtype in DTYPES}
    half = kernels.pack(sparse_weight(40, 64, 0.5, torch.bfloat16))
    denser = kernels.pack(sparse_weight(40, 64, 0.4, torch.bfloat16))
    full = kernels.pack(torch.randn(40, 64) + 10.0, "int8")
    assert max(p.density for p in sparse.values()) < 0.45 < half.density < 0.55 < denser.density < 0.75 and full.full
    first, rows = kernels.OUTER_ROWS, kernels.PREFILL_ROWS
    for isa in NATIVE:
        kernels.set_isa(isa)
        avx512 = isa == "avx512"
        outer = "outer" if avx512 else "kernel"
        for dtype in DTYPES:
            assert path(torch.randn(first - 1, 64).to(dtype), sparse[dtype]) == "kernel"
            assert path(torch.randn(first, 64).to(dtype), sparse[dtype]) == outer
            assert path(torch.randn(600, 64).to(dtype), sparse[dtype]) == ("outer" if avx512 else "tiled")
        assert path(torch.randn(rows[torch.bfloat16] - 1, 64).bfloat16(), denser) == outer
        assert path(torch.randn(rows[torch.bfloat16], 64).bfloat16(), denser) == "tiled"
        assert path(torch.randn(600, 64), denser) == ("outer" if avx512 else "tiled")  # fp32 x: fp32 tiles
        assert path(torch.randn(127, 64).bfloat16(), half) == ("outer" if avx512 else "tiled")
        assert path(torch.randn(128, 64).bfloat16(), half) == "tiled"
        codes = kernels.pack(kernels.unpack(half), "int8")
        assert path(torch.randn(600, 64).bfloat16(), codes) == ("outer" if avx512 else "tiled")
        assert path(torch.randn(rows[torch.float32] - 1, 64), full) == "kernel"
        assert path(torch.randn(rows[torch.float32], 64), full) == "tiled"
        columns = kernels.to_layout(sparse[torch.float32], "columns")
        assert path(torch.randn(first, 64), columns) == "kernel"
        assert path(torch.randn(rows[torch.float32], 64), columns) == "tiled"


@needs_native
@pytest.mark.parametrize("values", [None, "int8"])
def test_outer_products_never_touch_pruned_weights(values, native_calls):
    """Outer products multiply stored weights only: a NaN input reaches exactly the outputs whose rows store its
    column, or in the bf16 pair form its pair of columns (the dense product, and the inner-product kernel's
    expanded zeros, spread it to every output); the other tokens are untouched and exact. bf16 results round NaN
    to the canonical quiet NaN."""
    kernels.set_outer_rows(1)
    weight = sparse_weight(20, 40, 0.6)
    p = kernels.pack(weight, values)
    for dtype in DTYPES:
        x = torch.randn(17, 40).to(dtype)
        x[5, 7] = float("nan")
        y = kernels.spmm(x, p)
        if not native_calls.outer[-1]:
            continue
        pairs = dtype == torch.bfloat16 and values == "int8" and kernels._native.cpu_features() & 4
        reached = (weight[:, 7] != 0) | ((weight[:, 6] != 0) if pairs else False)
        assert torch.equal(y[5].isnan(), reached)
        others = torch.cat([x[:5], x[6:]])
        assert_close_to_truth(torch.cat([y[:5], y[6:]]), others, kernels.unpack(p), None)
        if dtype == torch.bfloat16:
            assert set(y[5][y[5].isnan()].view(torch.int16).tolist()) == {0x7FC0}


def test_outer_rows_setting():
    assert kernels.outer_rows() == kernels.OUTER_ROWS
    kernels.set_outer_rows(3)
    assert kernels.outer_rows() == 3
    with pytest.raises(ValueError, match="positive integer"):
        kernels.set_outer_rows(0)
    kernels.set_outer_rows(None)
    assert kernels.outer_rows() == kernels.OUTER_ROWS
    never = kernels.isa() == "avx512"
    assert kernels.prefill_rows(torch.float32, 0.3) == (kernels.NEVER if never else kernels.PREFILL_ROWS[torch.float32])


# ---------------------------------------------------------------------------------------------- column layout
def thresholded(x: torch.Tensor, tau: float | None) -> torch.Tensor:
    """The inputs the thresholded product must use, restated: |x| <= tau set to zero."""
    return x if tau is None else torch.where(x.float().abs() <= tau, torch.zeros_like(x), x)


@pytest.mark.parametrize("values", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("out, cols", [(1, 1), (7, 17), (16, 16), (17, 33), (40, 7), (130, 100)])
def test_column_layout_round_trips_bit_identically(out, cols, values):
    dtype = torch.bfloat16 if values == "bfloat16" else torch.float32
    weight = sparse_weight(out, cols, 0.7, dtype)
    if out >= 2 and cols >= 2:
        weight[:, 1] = 0.0  # an empty column
        weight[0, 0] = -0.0  # stored (non-zero bits)
    rows = kernels.pack(weight, "int8" if values == "int8" else None)
    columns = kernels.to_layout(rows, "columns")
    assert columns.layout == "columns" and columns.stored_shape == (cols, out) and columns.shape == (out, cols)
    assert columns.nnz == rows.nnz and kernels.to_layout(columns, "columns") is columns
    assert same_bits(kernels.unpack(columns), kernels.unpack(rows))
    back = kernels.to_layout(columns, "rows")
    assert torch.equal(back.mask, rows.mask) and torch.equal(back.values, rows.values)
    assert torch.equal(back.row_offsets, rows.row_offsets)
    # the column layout is the row layout of W.T: its mask is that of the transposed weight
    if values != "int8":
        assert torch.equal(columns.mask, kernels.pack(weight.t().contiguous()).mask)
    with pytest.raises(ValueError, match="layout"):
        kernels.to_layout(rows, "diagonal")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("values", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("out, cols", [(1, 1), (7, 17), (16, 16), (17, 33), (37, 53), (300, 129)])
def test_column_kernel_matches_float64_truth(isa, values, out, cols):
    """Column layout, with and without a threshold, one and several tokens, bias, every ISA: against float64
    truth of the thresholded inputs times the weight it holds. Odd shapes: rows not a multiple of 8 or 16, an
    empty row, an empty column, a full row."""
    kernels.set_isa(isa)
    dtype = torch.bfloat16 if values == "bfloat16" else torch.float32
    weight = sparse_weight(out, cols, 0.7, dtype, seed=out * cols)
    if cols >= 2:
        weight[:, 1] = 0.0
    p = kernels.to_layout(kernels.pack(weight, "int8" if values == "int8" else None), "columns")
    held = kernels.unpack(p)
    bias = torch.randn(out)
    for xdtype in DTYPES:
        for tokens in (1, 3):
            x = torch.randn(tokens, cols).to(xdtype)
            for tau in (None, 0.0, 0.6, 100.0):
                y = kernels.spmm(x, p, bias.to(xdtype), tau)
                assert_close_to_truth(y, thresholded(x, tau), held, bias.to(xdtype))


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_column_kernel_on_several_threads(threads):
    """Active columns split over the pool by their stored values, each part summed into its own buffer."""
    kernels.set_num_threads(threads)
    for values in (None, "int8"):
        weight = sparse_weight(576, 1536, 0.7, seed=threads)
        p = kernels.to_layout(kernels.pack(weight, values), "columns")
        x = torch.randn(2, 1536)
        for tau in (None, 0.5, 1.5):
            assert_close_to_truth(kernels.spmm(x, p, None, tau), thresholded(x, tau), kernels.unpack(p), None)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("values", ["float32", "bfloat16", "int8"])
def test_column_layout_prefill_takes_the_tiled_path(isa, values, monkeypatch):
    """Many tokens in the column layout: tiles of W.T's rows (W's columns), int8 scales applied per output row."""
    kernels.set_isa(isa)
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 7 * 22)  # 7 of W's columns a tile
    dtype = torch.bfloat16 if values == "bfloat16" else torch.float32
    weight = sparse_weight(22, 40, 0.7, dtype)
    p = kernels.to_layout(kernels.pack(weight, "int8" if values == "int8" else None), "columns")
    held = kernels.unpack(p)
    bias = torch.randn(22)
    kernels.set_prefill_rows(8)
    x = torch.randn(50, 40)
    for tau in (None, 0.5):
        y = kernels.spmm(x, p, bias, tau)
        assert_close_to_truth(y, thresholded(x, tau), held, bias)
    for r0, r1 in ((0, 40), (3, 11)):  # the tiles themselves: W.T's rows, int8 codes unscaled
        tile = kernels.unpack_rows(p, r0, r1)
        want = held.t()[r0:r1] if p.scales is None else (held / p.scales[:, None]).t()[r0:r1]
        torch.testing.assert_close(tile.float(), want.float(), rtol=1e-6, atol=1e-6)


def test_row_layout_applies_the_threshold_too():
    """A threshold is the same maths in either layout (the row layout just cannot skip the reads)."""
    weight = sparse_weight(33, 47, 0.6)
    rows = kernels.pack(weight)
    columns = kernels.to_layout(rows, "columns")
    x = torch.randn(4, 47)
    a, b = kernels.spmm(x, rows, None, 0.7), kernels.spmm(x, columns, None, 0.7)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert_close_to_truth(a, thresholded(x, 0.7), weight, None)
    nan = x.clone()
    nan[0, 3] = float("nan")  # NaN is kept, as in the reference: it reaches the output
    assert bool(kernels.spmm(nan, columns, None, 0.7)[0].isnan().all())


@pytest.mark.parametrize("cols", [1, 31, 32, 33, 65, 576])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_one_bfloat16_token_with_bfloat16_values(cols, sparsity):
    """Decode of bf16 x with bf16 values (on AVX-512 with AVX512_BF16: 32 columns per vdpbf16ps on the expanded
    values, x read in place; elsewhere widened to fp32) against float64 truth: ragged row ends, an empty row, a
    full weight (an LM head held as it is, no mask read), with and without bias, strided x."""
    weight = sparse_weight(23, cols, sparsity, torch.bfloat16, seed=cols)
    for p in (kernels.pack(weight), kernels.pack_full(weight)):
        for bias in (None, torch.randn(23).bfloat16()):
            x = torch.randn(1, cols).bfloat16()
            assert_close_to_truth(kernels.spmm(x, p, bias), x, weight, bias)
            wide = torch.randn(1, cols + 5).bfloat16()[:, :cols]
            assert_close_to_truth(kernels.spmm(wide, p, bias), wide, weight, bias)
