"""A pruned weight kept compressed in memory (bitmask + packed values) and multiplied with directly on CPU.

Format of a pruned weight ``W [out, in]`` (``y = x @ W.T``):

- ``mask``: uint8 ``[out, ceil(in / 8)]``; bit ``j % 8`` (LSB first) of byte ``j // 8`` of row ``o`` is set iff
  ``W[o, j]`` is stored (packed by :mod:`secateurs.format.bits`). A weight is stored iff its bit pattern is
  non-zero, so ``-0.0`` survives and :func:`unpack` gives back exactly what :func:`pack` was given.
- ``values``: the stored weights in row-major order (float32 or bfloat16), followed here by zero padding so the
  SIMD kernel may load a full vector past the last value; or int8 codes ``q`` with one float32 ``scale`` per row,
  ``W[o, j] = scales[o] * q[o, j]`` (:func:`quantize_rows`: symmetric round-to-nearest, every stored weight kept
  non-zero so the mask is unchanged).
- ``row_offsets``: int64 ``[out + 1]``, where each row's values start (prefix sums of per-row popcounts).

The **column layout** (``layout="columns"``, :func:`to_layout`) holds the same weight as the rows of ``W.T``: mask
``[in, ceil(out / 8)]``, values column by column, offsets ``[in + 1]`` (int8 scales stay per output row). Decode
with activation sparsity uses it: an input thresholded to zero (:func:`spmm`'s ``threshold``) means its column is
never read. A model holds each weight in one layout, chosen when activation sparsity is switched on.

At 70% sparsity this is 0.3 * 4 + 1/8 = 1.325 bytes per fp32 weight instead of 4 (0.425 with int8 values):
decoding a token is bound by how many weight bytes are read, so fewer bytes is more tokens per second.

:func:`spmm` runs the compiled kernel (``secateurs._sparse_kernel``: AVX-512, AVX2 or scalar, picked at run time)
when it was built, and a pure-torch reference (dense reconstruction, then ``F.linear``) otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import os
import struct
import sys
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from secateurs.format.bits import pack_mask, packed_width, quantize_rows, row_counts, stored_bits, unpack_mask

try:  # the extension is optional: a machine without a compiler still installs and runs the torch path
    from secateurs import _sparse_kernel as _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None

ISAS = ("avx512", "avx2", "scalar", "torch")
LAYOUTS = ("rows", "columns")
DTYPES = (torch.float32, torch.bfloat16)
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
PAD_VALUES = 64  # zero values after the last stored one: a 16-lane load (or two) never leaves the buffer
ISA_ENV = "SECATEURS_KERNEL_ISA"

_ISA_CODE = {"scalar": 0, "avx2": 1, "avx512": 2}
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


@dataclass(frozen=True, eq=False, repr=False)
class PackedWeight:
    """A pruned ``[out, in]`` weight in the bitmask + packed-values format (see the module docstring)."""

    shape: tuple[int, int]
    mask: torch.Tensor
    values: torch.Tensor
    row_offsets: torch.Tensor
    nnz: int
    scales: torch.Tensor | None = None  # float32 [out] for int8 values, else None
    layout: str = "rows"  # "columns": mask, values and offsets are those of W.T (see the module docstring)
    _args: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        # everything the native call needs about this weight, computed once (the call is made ~200 times a token)
        args = (
            self.mask.data_ptr(),
            self.values.data_ptr(),
            _DTYPE_CODE.get(self.values.dtype, -1),
            self.row_offsets.data_ptr(),
            self.shape[0],
            self.shape[1],
        )
        object.__setattr__(self, "_args", args)
        object.__setattr__(self, "_scales_ptr", 0 if self.scales is None else self.scales.data_ptr())
        # the column layout's tiles are W.T's rows: int8 codes unpacked with unit scales, the real ones applied after
        unit = None
        if self.layout == "columns" and self.scales is not None:
            unit = torch.ones(self.shape[1], dtype=torch.float32)
        object.__setattr__(self, "_unit_scales", unit)

    def __deepcopy__(self, memo) -> PackedWeight:
        # a copy must hold pointers to its own tensors: build it anew (the cached native arguments are addresses)
        tensors = {name: copy.deepcopy(getattr(self, name), memo) for name in ("mask", "values", "row_offsets")}
        scales = None if self.scales is None else copy.deepcopy(self.scales, memo)
        return PackedWeight(self.shape, nnz=self.nnz, scales=scales, layout=self.layout, **tensors)

    @property
    def stored_shape(self) -> tuple[int, int]:
        """The shape of the matrix the mask and values describe: ``shape``, or ``(in, out)`` in the column layout."""
        return self.shape if self.layout == "rows" else (self.shape[1], self.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored values (int8 for quantised ones; :func:`unpack` then gives float32)."""
        return self.values.dtype

    def __repr__(self) -> str:
        layout = "" if self.layout == "rows" else f", layout={self.layout}"
        density = f"{self.density:.3f}"
        return f"PackedWeight(shape={self.shape}, dtype={self.dtype}, nnz={self.nnz}, density={density}{layout})"

    @property
    def full(self) -> bool:
        """Every weight is stored (a dense matrix on the kernel, such as an LM head): the values, row by row, are
        the matrix itself, and the kernel reads them without the mask."""
        return self.nnz == self.shape[0] * self.shape[1]

    @property
    def density(self) -> float:
        """Fraction of the weights that are stored."""
        numel = self.shape[0] * self.shape[1]
        return self.nnz / numel if numel else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of weight data a multiplication reads: the stored values and the mask (not the padding)."""
        scales = 0 if self.scales is None else self.scales.numel() * 4
        return self.nnz * self.values.element_size() + self.mask.numel() + self.row_offsets.numel() * 8 + scales


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, not {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if weight.dtype not in DTYPES:
        raise ValueError(f"weight dtype must be float32 or bfloat16, got {weight.dtype}")
    if weight.device.type != "cpu":
        raise ValueError(f"weight must be on the CPU, got {weight.device}")


def _with_padding(values: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(values.numel() + PAD_VALUES, dtype=values.dtype)
    out[: values.numel()] = values
    return out


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def pack(weight: torch.Tensor, values: str | torch.dtype | None = None) -> PackedWeight:
    """Compress a 2-D float32/bfloat16 CPU weight: keep the entries whose bit pattern is non-zero.

    ``values="int8"`` stores them as int8 codes with one float32 scale per row (:func:`quantize_rows`)."""
    _check_weight(weight)
    out, cols = weight.shape
    bits = stored_bits(weight)
    mask = pack_mask(bits)
    offsets = _offsets(bits.sum(1))
    if values in ("int8", torch.int8):
        q, scales = quantize_rows(weight, bits)
        kept = q[bits]
        return PackedWeight((out, cols), mask, _with_padding(kept), offsets, kept.numel(), scales)
    if values not in (None, "float32", "bfloat16", weight.dtype):
        raise ValueError(f"values must be int8 or the weight's own dtype, got {values!r}")
    kept = weight.contiguous()[bits]
    return PackedWeight((out, cols), mask, _with_padding(kept), offsets, kept.numel())


def pack_full(weight: torch.Tensor) -> PackedWeight:
    """A 2-D float32/bfloat16 CPU weight with every entry stored, zeros too (an LM head on the kernel's threads: the
    kernel's dense path reads no mask). When the rows are a whole number of 16-value vectors and the weight is
    contiguous, the values are the weight's own memory (no copy: no SIMD load can pass its end); otherwise a padded
    copy."""
    _check_weight(weight)
    out, cols = weight.shape
    mask = pack_mask(torch.ones(1, cols, dtype=torch.bool)).expand(out, -1).contiguous()
    offsets = torch.arange(out + 1, dtype=torch.int64) * cols
    flat = weight.reshape(-1)
    if not (weight.is_contiguous() and cols % 16 == 0):
        flat = _with_padding(flat)
    return PackedWeight((out, cols), mask, flat, offsets, out * cols)


def from_parts(mask: torch.Tensor, values: torch.Tensor, shape, scales: torch.Tensor | None = None) -> PackedWeight:
    """Rebuild a packed weight from checkpoint parts: the mask and exactly the ``nnz`` stored values (no padding),
    and for int8 values their float32 per-row ``scales`` [out].

    Checks that the parts agree with each other and with ``shape``; raises ``ValueError`` saying what is wrong.
    """
    try:
        out, cols = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be two integers (out, in), got {shape!r}") from None
    if out < 0 or cols < 0:
        raise ValueError(f"shape must be non-negative, got {(out, cols)}")
    if not isinstance(mask, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise ValueError("mask and values must be torch tensors")
    nbytes = packed_width(cols)
    if mask.dtype != torch.uint8:
        raise ValueError(f"mask dtype must be uint8, got {mask.dtype}")
    if tuple(mask.shape) != (out, nbytes):
        raise ValueError(f"mask shape must be {(out, nbytes)} for weight shape {(out, cols)}, got {tuple(mask.shape)}")
    if values.dtype not in VALUE_DTYPES:
        raise ValueError(f"values dtype must be float32, bfloat16 or int8, got {values.dtype}")
    if (values.dtype == torch.int8) != (scales is not None):
        raise ValueError("int8 values need per-row scales (and only they have scales)")
    if scales is not None:
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != (out,):
            raise ValueError(f"scales must be a float32 tensor of shape ({out},)")
        if scales.device.type != "cpu" or not bool(torch.isfinite(scales).all()):
            raise ValueError("scales must be finite and on the CPU")
        scales = scales.contiguous()
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D, got shape {tuple(values.shape)}")
    if mask.device.type != "cpu" or values.device.type != "cpu":
        raise ValueError("mask and values must be on the CPU")
    mask = mask.contiguous()
    counts = row_counts(mask, cols)
    nnz = int(counts.sum())
    if values.numel() != nnz:
        raise ValueError(f"mask marks {nnz} stored weights but values holds {values.numel()}")
    return PackedWeight((out, cols), mask, _with_padding(values), _offsets(counts), nnz, scales)


def _stored_dense(p: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The stored matrix (``stored_shape``) dense, values (or int8 codes) cast to ``dtype``."""
    shape = p.stored_shape
    dense = torch.zeros(shape, dtype=dtype)
    dense.masked_scatter_(unpack_mask(p.mask, shape[1]), p.values[: p.nnz].to(dtype))
    return dense


def unpack(p: PackedWeight) -> torch.Tensor:
    """The dense ``[out, in]`` weight, bit-identical to what was packed (pruned entries are +0.0); int8 values come
    back dequantised, as float32 ``scale * q``. Either layout."""
    dense = _stored_dense(p, torch.float32 if p.scales is not None else p.dtype)
    if p.layout == "columns":
        dense = dense.t().contiguous()
    return dense * p.scales[:, None] if p.scales is not None else dense


def to_layout(p: PackedWeight, layout: str) -> PackedWeight:
    """The same weight in the other layout (``rows`` or ``columns``); the same object when it is already there.
    Values and codes move as they are (bit-identical), int8 scales stay per output row."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == p.layout:
        return p
    shape = p.stored_shape
    bits = unpack_mask(p.mask, shape[1])
    dense = torch.zeros(shape, dtype=p.values.dtype)
    dense.masked_scatter_(bits, p.values[: p.nnz])
    bits_t = bits.t().contiguous()
    kept = dense.t().contiguous()[bits_t]
    mask, offsets = pack_mask(bits_t), _offsets(bits_t.sum(1))
    return PackedWeight(p.shape, mask, _with_padding(kept), offsets, p.nnz, p.scales, layout)


# ----------------------------------------------------------------------------------------- ISA and threads
def native_available() -> bool:
    """Whether the compiled kernel was built and imported."""
    return _native is not None


def supported_isas() -> list[str]:
    """The paths this machine can run, best first (``torch`` always)."""
    if _native is None:
        return ["torch"]
    features = _native.cpu_features()  # bit 0: AVX2+FMA, bit 1: AVX-512 F/BW/VL/DQ/VBMI2, bit 3: + VNNI
    return [name for name, bit in (("avx512", 2), ("avx2", 1)) if features & bit] + ["scalar", "torch"]


def vnni_available() -> bool:
    """Whether :func:`spmm` multiplies int8 inputs (``int8_inputs=True``) with the AVX-512 VNNI kernel now: the
    native kernel is built, this CPU has AVX-512 VNNI, and the AVX-512 path is in use. Otherwise the same
    quantised inputs go through the float kernel (:func:`fake_quantize_inputs`: equal up to fp32 rounding)."""
    return _native is not None and _isa == "avx512" and bool(_native.cpu_features() & 8)


def _checked_isa(name: str) -> str:
    if name not in ISAS:
        raise ValueError(f"unknown kernel ISA {name!r}: choose one of {', '.join(ISAS)}")
    if name not in supported_isas():
        why = "the native kernel is not built" if _native is None else "this CPU does not support it"
        raise ValueError(f"kernel ISA {name!r} is not available: {why} (available: {', '.join(supported_isas())})")
    return name


_isa = supported_isas()[0]
_threads: int | None = None
# From how many rows of x the tiled path (decompress + dense matmul) beats the bitmask kernel's inner-product
# blocks, measured on SmolLM2's shapes at 70% on 2 AVX-512 cores (idle): fp32 crosses over between 64 and 256 rows
# by shape, bf16 (whose dense matmul is much faster than the kernel) between 16 and 128. The decompression runs on
# the kernel's threads, where torch's OpenMP workers still spinning after the previous matmul slow it 3-5x.
# Keyed by the dtype the tiles are multiplied in (see _matmul_dtype). On AVX-512, OUTER_PREFILL_ROWS (below) takes
# their place for the weights its outer products serve.
PREFILL_ROWS = {torch.float32: 128, torch.bfloat16: 32}
# From how many rows of x a weight with every entry stored (an LM head on the kernel) goes to the dense matmul.
DENSE_PREFILL_ROWS = 8
# Threads that decompress a prefill tile: the caller alone, since torch's OpenMP workers, spinning after the
# previous tile's matmul, hold the other cores for a while (decompressing beside them ran 3-5x slower).
UNPACK_THREADS = int(os.environ.get("SECATEURS_UNPACK_THREADS", "1"))
_prefill_rows: int | None = None
# From how many rows of x the AVX-512 kernel multiplies a row-layout weight by outer products (each stored weight
# times 64 tokens of its input: work in proportion to the stored weights) rather than by its inner-product blocks
# (16 columns of a row expanded from the mask, times 4 tokens): they cross over at 12-16 rows on SmolLM2's shapes
# at 50-70%, fp32 and bf16, 1 thread (benchmarks/kernel_shapes.py --prefill; AMD EPYC Zen 4 machine).
OUTER_ROWS = 16
_outer_rows: int | None = None
NEVER = sys.maxsize  # a row count no x reaches
# From how many rows of x the tiles beat the AVX-512 kernel's outer products, by the dtype the tiles would multiply
# in and the stored fraction of the weight: the first (up to this density, from this many rows) that applies; a
# denser weight (and a full one, such as an LM head) keeps PREFILL_ROWS. Measured as for OUTER_ROWS, 1 thread,
# 64-512 tokens: fp32 outer products ran at 1.4-2.5x dense F.linear at 50-70% sparsity and 1.1x at 30%, the tiles
# at 0.8-1.0x, and tied with them at 80-90%; bf16 values with bf16 x (the bf16 pair form against a bf16 matmul) at
# 70% 1.0-1.4x dense bf16 against 0.5-1.0x, at 50% ahead up to 64 tokens and 5-20% behind from 128 (0.7-1.0x, the
# tiles 0.8-1.0x), and behind at 30-40% (0.7-0.8x against 0.8-0.95x); int8 codes with bf16 x (key torch.int8: bf16
# tiles of int8 codes, slower to decompress) at 50% 0.8-0.96x against 0.64-0.89x.
OUTER_PREFILL_ROWS = {
    torch.float32: ((0.75, NEVER),),
    torch.bfloat16: ((0.45, NEVER), (0.55, 128)),
    torch.int8: ((0.55, NEVER),),
}


def set_outer_rows(n: int | None) -> None:
    """From how many rows of ``x`` (tokens) the AVX-512 kernel multiplies by outer products; None: OUTER_ROWS; a
    huge number: never (the inner-product blocks for every row count below :func:`prefill_rows`)."""
    global _outer_rows
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"outer rows must be a positive integer or None, got {n!r}")
    _outer_rows = n


def outer_rows() -> int:
    """The row count from which the AVX-512 kernel multiplies a row-layout weight by outer products."""
    return _outer_rows if _outer_rows is not None else OUTER_ROWS


def set_isa(name: str | None) -> None:
    """Force the path :func:`spmm` takes (``avx512``, ``avx2``, ``scalar``, ``torch``); None = the best supported."""
    global _isa
    _isa = supported_isas()[0] if name is None else _checked_isa(name)


def isa() -> str:
    """The path :func:`spmm` uses now: ``avx512``, ``avx2``, ``scalar``, or ``torch`` (no native library)."""
    return _isa


def set_num_threads(n: int | None) -> None:
    """Threads the native kernel splits rows over; None = ``torch.get_num_threads()`` at each call."""
    global _threads
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"number of threads must be a positive integer or None, got {n!r}")
    _threads = n


def num_threads() -> int:
    return _threads if _threads is not None else torch.get_num_threads()


def set_prefill_rows(n: int | None) -> None:
    """From how many rows of ``x`` (tokens) :func:`spmm` decompresses the weight tile by tile and multiplies each
    tile with the dense matmul; None: the defaults of :data:`PREFILL_ROWS` by matmul dtype; a huge number: never."""
    global _prefill_rows
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"prefill rows must be a positive integer or None, got {n!r}")
    _prefill_rows = n


def prefill_rows(dtype: torch.dtype = torch.float32, density: float | None = None) -> int:
    """The row count from which :func:`spmm` takes the tiled path when the tiles are multiplied in ``dtype``
    (bfloat16: bfloat16 x with bfloat16 or int8 values; float32 otherwise; torch.int8 for bfloat16 tiles of int8
    codes, which differ only with outer products). ``density``: the stored fraction of a weight the AVX-512 kernel
    can multiply by outer products (one in the row layout), None for one it cannot; with outer products the
    thresholds are :data:`OUTER_PREFILL_ROWS` (:data:`NEVER`: not tiled at all)."""
    if _prefill_rows is not None:
        return _prefill_rows
    if density is not None and _isa == "avx512":
        for most, rows in OUTER_PREFILL_ROWS[dtype]:
            if density <= most:
                return rows
    return PREFILL_ROWS[torch.bfloat16 if dtype == torch.int8 else dtype]


def _matmul_dtype(x_dtype: torch.dtype, values_dtype: torch.dtype) -> torch.dtype:
    """The dtype the tiled path multiplies in: bfloat16 when x is and the values are bfloat16 or int8 codes."""
    bf16 = x_dtype == torch.bfloat16 and values_dtype in (torch.bfloat16, torch.int8)
    return torch.bfloat16 if bf16 else torch.float32


def _tiles_key(x_dtype: torch.dtype, values_dtype: torch.dtype) -> torch.dtype:
    """:func:`prefill_rows`' key: the matmul dtype, or torch.int8 for bfloat16 tiles of int8 codes."""
    dtype = _matmul_dtype(x_dtype, values_dtype)
    return torch.int8 if dtype == torch.bfloat16 and values_dtype == torch.int8 else dtype


if os.environ.get(ISA_ENV):
    try:
        set_isa(os.environ[ISA_ENV])
    except ValueError as exc:
        raise ValueError(f"${ISA_ENV}: {exc}") from None


# ----------------------------------------------------------------------------------------- multiplication
def _check_spmm(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in DTYPES:
        raise ValueError(f"x must be a float32 or bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not x.is_cpu:
        raise ValueError(f"x must be on the CPU, got {x.device}")
    if x.dim() == 0 or x.shape[-1] != p.shape[1]:
        raise ValueError(f"x's last dimension must be {p.shape[1]} (the weight's in-features), got {tuple(x.shape)}")
    if bias is not None:
        if bias.dtype not in DTYPES or not bias.is_cpu or bias.shape != (p.shape[0],):
            raise ValueError(f"bias must be a CPU float32/bfloat16 tensor of shape ({p.shape[0]},)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMS norm, ``weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)``, in one
    native call for a contiguous CPU x and weight of one dtype (float32 or bfloat16; a decode step's 61 norms cost
    ~1.5 ms as torch's small ops on SmolLM2, 2 cores); torch's ops otherwise. Equal to rounding: the mean of squares
    is summed in float64."""
    ok = (
        _native is not None
        and x.dtype in DTYPES
        and weight.dtype == x.dtype
        and x.is_cpu
        and weight.is_cpu
        and x.is_contiguous()
        and weight.is_contiguous()
        and x.dim() > 0
        and weight.shape == x.shape[-1:]
        and not (x.requires_grad and torch.is_grad_enabled())
    )
    if not ok:
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    y = torch.empty_like(x)
    n = x.shape[-1]
    eps_bits = struct.unpack("<I", struct.pack("<f", eps))[0]
    _native.rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // n, n, eps_bits, _DTYPE_CODE[x.dtype])
    return y


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, scale: float) -> torch.Tensor | None:
    """One query token's attention over the first ``length`` positions of a float32 KV cache, in one native call:
    q ``[1, heads, 1, d]``, k and v ``[1, kv_heads, max_len, d]`` (contiguous, float32, CPU), query heads grouped
    over kv heads as transformers' ``repeat_kv`` pairs them; ``[1, heads, 1, d]``. None when the native kernel is
    not built or the tensors are not of that form (the caller then uses ``scaled_dot_product_attention``, which
    costs ~35 us a call for SmolLM2's 9 heads on one core against a few here)."""
    if _native is None or q.dim() != 4 or q.shape[0] != 1 or q.shape[2] != 1 or k.shape != v.shape:
        return None
    heads, d = q.shape[1], q.shape[3]
    _, kv_heads, max_len, dk = k.shape
    f32 = torch.float32
    if q.dtype != f32 or k.dtype != f32 or v.dtype != f32 or dk != d or heads % kv_heads or not 0 < length <= max_len:
        return None
    if not (q.is_cpu and k.is_cpu and v.is_cpu and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        return None
    out = torch.empty_like(q)
    scale_bits = struct.unpack("<I", struct.pack("<f", scale))[0]
    _native.attend(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), heads, kv_heads, length, d, max_len * d, scale_bits
    )
    return out


I8_GROUP = 64  # inputs per scale when activations are quantised to int8 (one zmm of codes)


def quantize_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., in]`` as the int8 codes and float32 scales the VNNI kernel multiplies: symmetric, one scale per
    group of :data:`I8_GROUP` inputs (the last group padded with zeros), ``scale = max|x| / 127`` and
    ``code = round_half_even(x * (127 / max|x|))``, in float32 (an all-zero group: codes and scale 0). Returns
    (codes ``[..., groups * I8_GROUP]`` int8, scales ``[..., groups]``)."""
    xf = x.float()
    cols = xf.shape[-1]
    groups = -(-cols // I8_GROUP)
    xp = F.pad(xf, (0, groups * I8_GROUP - cols)).reshape(*xf.shape[:-1], groups, I8_GROUP)
    amax = xp.abs().amax(-1)
    full = torch.full_like(amax, 127.0)  # tensor / tensor: IEEE division (a scalar numerator takes a reciprocal)
    inv = torch.where(amax > 0, full / amax, torch.zeros_like(amax))
    codes = torch.round(xp * inv.unsqueeze(-1)).to(torch.int8)
    return codes.reshape(*xf.shape[:-1], groups * I8_GROUP), amax / full


def fake_quantize_inputs(x: torch.Tensor) -> torch.Tensor:
    """``x`` replaced by its int8 round trip (:func:`quantize_inputs`), as float32: what the VNNI kernel multiplies."""
    codes, scales = quantize_inputs(x)
    cols = x.shape[-1]
    groups = scales.shape[-1]
    deq = codes.float().reshape(*scales.shape, I8_GROUP) * scales.unsqueeze(-1)
    return deq.reshape(*x.shape[:-1], groups * I8_GROUP)[..., :cols]


def threshold_inputs(x: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """``x`` with every entry of magnitude at most ``threshold`` set to zero (NaN kept); ``x`` itself for None.
    The comparison is in float32 whatever x's dtype (as the kernel's: a bfloat16 x is compared exactly)."""
    if threshold is None:
        return x
    return x.masked_fill(x.abs().float() <= threshold, 0)


def spmm_reference(
    x: torch.Tensor,
    p: PackedWeight,
    bias: torch.Tensor | None = None,
    threshold: float | None = None,
    int8_inputs: bool = False,
) -> torch.Tensor:
    """``x' @ W.T (+ bias)`` through the dense weight, accumulated in fp32, where ``x'`` is ``x`` thresholded
    (:func:`threshold_inputs`) and, with ``int8_inputs``, quantised (:func:`fake_quantize_inputs`): the torch
    fallback and the tests' truth."""
    xt = threshold_inputs(x, threshold)
    xf = fake_quantize_inputs(xt) if int8_inputs else xt.float()
    weight = unpack(p).float()
    y = F.linear(xf, weight, None if bias is None else bias.float())
    return y.to(x.dtype)


TILE_ELEMENTS = 1 << 22  # weights per decompressed tile (16 MB in fp32): a whole linear of a small model is one


def unpack_rows(
    p: PackedWeight, r0: int, r1: int, out: torch.Tensor | None = None, threads: int | None = None
) -> torch.Tensor:
    """Rows [r0, r1) of the stored matrix, dense ``[r1 - r0, in]``: float32 (int8 codes times their scales) or, for
    bfloat16 values, bfloat16; written into ``out`` when given (contiguous, of that dtype and size). Uses the
    compiled kernel's SIMD decompression when it is built, :func:`unpack` otherwise. In the column layout the
    stored matrix is ``W.T`` (rows [r0, r1) are W's columns) and int8 codes come unscaled. ``threads``: the
    kernel's threads for the decompression (default :func:`num_threads`)."""
    n, cols = p.stored_shape
    rows = r1 - r0
    dtype = torch.bfloat16 if p.values.dtype == torch.bfloat16 else torch.float32
    if not 0 <= r0 <= r1 <= n:
        raise ValueError(f"rows [{r0}, {r1}) are not within the weight's {n}")
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype)
    elif out.dtype != dtype or not out.is_contiguous() or out.numel() != rows * cols:
        raise ValueError(f"out must be a contiguous {dtype} tensor of {rows * cols} elements")
    if _isa == "torch" or rows == 0 or cols == 0:
        if p.layout == "rows":
            out.view(rows, cols).copy_(unpack(p)[r0:r1])
        else:
            out.view(rows, cols).copy_(_stored_dense(p, dtype)[r0:r1])
    else:
        m, v, code, offsets = p._args[:4]
        scales = p._scales_ptr if p._unit_scales is None else p._unit_scales.data_ptr()
        threads = num_threads() if threads is None else threads
        _native.unpack(m, v, code, offsets, n, cols, scales, r0, r1, out.data_ptr(), _ISA_CODE[_isa], threads)
    return out.view(rows, cols)


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads set to ``n`` for the block (the kernel's own count: the dense matmuls of prefill then
    use the same cores as the kernel does, whatever torch was set to for decoding), restored after."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


_scratch = threading.local()


def _scratch_buffer(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A buffer of at least ``n`` elements kept per thread (a fresh one every call would page-fault its memory
    in each time: that alone costs as much as decompressing into it)."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < n:
        buf = buffers[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n]


def _spmm_tiled(x2: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2 @ W.T (+ bias)`` for many rows of x: W decompressed a tile of rows at a time into one scratch buffer,
    each tile multiplied by the dense matmul (prefill: the bitmask kernel is compute-bound there). bfloat16 x with
    bfloat16 or int8 values multiplies in bfloat16, as a dense bfloat16 model does (an int8 code times its scale
    rounded to bfloat16: a relative error of at most 2^-9, below the int8 rounding itself); anything else in
    float32."""
    out, cols = p.stored_shape
    stored = torch.bfloat16 if p.values.dtype == torch.bfloat16 else torch.float32
    dtype = _matmul_dtype(x2.dtype, p.values.dtype)
    xc = x2 if x2.dtype == dtype else x2.to(dtype)
    b = None if bias is None else bias.to(dtype)
    rows = max(1, min(out, TILE_ELEMENTS // cols))
    buffer = _scratch_buffer(rows * cols, stored)

    def tile(r0: int, r1: int) -> torch.Tensor:
        t = unpack_rows(p, r0, r1, buffer[: (r1 - r0) * cols], threads=UNPACK_THREADS)
        return t if t.dtype == dtype else t.to(dtype)

    with _torch_threads(num_threads()):
        return _tiles(xc, p, b, rows, tile, x2.dtype)


def _tiles(xc, p, b, rows, tile, x_dtype):
    """The products of :func:`_spmm_tiled`, tile by tile."""
    out, cols = p.stored_shape
    dtype = xc.dtype
    if p.layout == "columns":  # tiles of W.T: y = sum over tiles of x[:, tile's inputs] @ tile
        y = torch.zeros(xc.shape[0], cols, dtype=torch.float32 if p.scales is not None else dtype)
        for r0 in range(0, out, rows):
            r1 = min(out, r0 + rows)
            y.addmm_(xc[:, r0:r1].to(y.dtype), tile(r0, r1).to(y.dtype))
        if p.scales is not None:
            y *= p.scales
        if b is not None:
            y += b.to(y.dtype)
        return y if y.dtype == x_dtype else y.to(x_dtype)

    if rows == out:  # one tile: the product lands in place
        y = F.linear(xc, tile(0, out), b)
        return y if y.dtype == x_dtype else y.to(x_dtype)
    y = torch.empty(xc.shape[0], out, dtype=dtype)
    for r0 in range(0, out, rows):
        r1 = min(out, r0 + rows)
        y[:, r0:r1] = F.linear(xc, tile(r0, r1), None if b is None else b[r0:r1])
    return y if y.dtype == x_dtype else y.to(x_dtype)


def spmm(
    x: torch.Tensor,
    p: PackedWeight,
    bias: torch.Tensor | None = None,
    threshold: float | None = None,
    int8_inputs: bool = False,
) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` with the packed weight; x ``[..., in]`` float32/bfloat16, result in x's dtype.

    Decode-sized x runs the bitmask kernel, which accumulates in fp32 whatever the dtypes of x and the values; from
    :func:`outer_rows` rows the AVX-512 kernel multiplies by outer products (for bfloat16 x with bfloat16 or int8
    values, bf16 products as the dense model's, accumulated in fp32); from :func:`prefill_rows` rows (prefill
    where outer products are not the faster) spmm decompresses the weight tile by tile and uses the dense matmul on
    each tile, in the values' precision (bfloat16 values: a bfloat16 matmul, as the dense model). Outer products
    multiply the stored weights only: a NaN or infinite input reaches the outputs whose rows store its column (in
    the bf16 pair form, its pair of columns), where a dense product (0 * inf = NaN) spreads it to all of them.
    ``threshold``: inputs of magnitude at most this count as zero (activation sparsity); in the column layout the
    decode kernel then never reads their columns.

    ``int8_inputs`` (int8 values in the row layout only): x is quantised to int8, one scale per group of
    :data:`I8_GROUP` inputs (:func:`quantize_inputs`), and multiplied with the int8 codes by integer dot products
    (AVX-512 VNNI, every row count: the same numbers for prompt and decode), as llama.cpp multiplies Q8_0 weights
    with Q8_0 activations; without VNNI the quantised x goes through the float kernel. CPU only.
    """
    _check_spmm(x, p, bias)
    out, cols = p.shape
    if int8_inputs:
        if p.values.dtype != torch.int8 or p.layout != "rows":
            raise ValueError("int8 inputs need a weight with int8 values in the row layout")
        if not vnni_available() or out == 0 or cols == 0 or x.numel() == 0:
            x8 = fake_quantize_inputs(threshold_inputs(x, threshold))
            return spmm(x8, p, None if bias is None else bias.float()).to(x.dtype)
    if _isa == "torch" or out == 0 or cols == 0 or x.numel() == 0:  # (nothing to multiply: no native call)
        return spmm_reference(x, p, bias, threshold)
    if x.is_contiguous():  # the common case, kept cheap: ~210 calls a token
        x2, stride = x, cols
    else:
        x2 = x.reshape(-1, cols)
        if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < cols):
            x2 = x2.contiguous()
        stride = x2.stride(0) if x2.shape[0] > 1 else cols
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    rows = x.numel() // cols
    if int8_inputs:  # the VNNI kernel for every row count
        return _spmm_native(x, x2, stride, rows, p, bias, threshold, 2)
    if rows >= DENSE_PREFILL_ROWS and p.full and p.layout == "rows" and p.scales is None:
        # every weight stored, float values: they are the matrix itself, multiplied in place (no decompression)
        dtype = _matmul_dtype(x.dtype, p.values.dtype)  # as the tiled path multiplies
        W = p.values[: p.nnz].view(out, cols).to(dtype)
        x2 = threshold_inputs(x2.reshape(rows, cols), threshold).to(dtype)
        with _torch_threads(num_threads()):
            y = F.linear(x2, W, None if bias is None else bias.to(dtype))
        return y.to(x.dtype).reshape(*x.shape[:-1], out)
    by_rows = p.layout == "rows"
    if rows >= prefill_rows(_tiles_key(x.dtype, p.values.dtype), p.density if by_rows else None):
        x2 = threshold_inputs(x2.reshape(rows, cols), threshold)
        return _spmm_tiled(x2, p, bias).reshape(*x.shape[:-1], out)
    return _spmm_native(x, x2, stride, rows, p, bias, threshold, int(_isa == "avx512" and rows >= outer_rows()))


def _spmm_native(x, x2, stride, rows, p, bias, threshold, path):
    """The native kernel's call for :func:`spmm` (``path``: 0 rows, 1 outer products, 2 int8 inputs; the column
    layout ignores it)."""
    out, cols = p.shape
    by_rows = p.layout == "rows"
    if threshold is not None and by_rows:  # the row kernel reads every column: threshold x first
        x2, stride, threshold = threshold_inputs(x2.reshape(rows, cols), threshold), cols, None
    y = torch.empty((*x.shape[:-1], out), dtype=x.dtype)
    args = (
        *p._args,
        x2.data_ptr(),
        stride,
        rows,
        _DTYPE_CODE[x.dtype],
        0 if bias is None else bias.data_ptr(),
        -1 if bias is None else _DTYPE_CODE[bias.dtype],
        y.data_ptr(),
        _ISA_CODE[_isa],
        _threads if _threads is not None else torch.get_num_threads(),
        p._scales_ptr,
    )
    if not by_rows:
        _native.spmm_columns(*args, -1.0 if threshold is None else float(threshold))
    else:
        _native.spmm(*args, 0 if path == 1 and p.full else path)
    return y
