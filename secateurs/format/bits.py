"""Boolean [rows, cols] masks packed 1 bit per entry, and the byte counts of packed weights.

A packed mask is uint8 ``[rows, ceil(cols / 8)]``: bit ``j % 8`` (least significant first) of byte ``j // 8`` of
row ``r`` holds ``mask[r, j]``; the bits past the last column of a row are zero. The same layout serves the sparse
checkpoint (bit set = weight stored), the in-memory sparse kernel and saved pruning masks (bit set = pruned).
"""

from __future__ import annotations

import math

import torch

_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()  # byte value -> its 8 bits, LSB first
_POPCOUNT = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int64)
_AS_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def packed_width(cols: int) -> int:
    """Bytes per row of a packed mask of ``cols`` columns."""
    return (cols + 7) // 8


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool [rows, cols] tensor into uint8 [rows, ceil(cols / 8)] (LSB first, zero padding); on the CPU."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a 2-D bool tensor, got {got}")
    rows, cols = mask.shape
    nbytes = packed_width(cols)
    bits = torch.zeros(rows, nbytes * 8, dtype=torch.uint8)
    bits[:, :cols] = mask.detach().cpu()
    bits = bits.view(rows, nbytes, 8)
    packed = bits[..., 0].clone()
    for k in range(1, 8):
        packed |= bits[..., k] << k
    return packed


def _check_packed(packed: torch.Tensor, cols: int) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        got = f"{packed.dtype} {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed mask must be a 2-D uint8 tensor, got {got}")
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 0:
        raise ValueError(f"cols must be a non-negative integer, got {cols!r}")
    if packed.shape[1] != packed_width(cols):
        raise ValueError(f"packed mask has {packed.shape[1]} bytes per row, {cols} columns need {packed_width(cols)}")
    if cols % 8 and packed.shape[0] and bool((packed[:, -1] >> (cols % 8)).any()):
        raise ValueError(f"mask has bits set past column {cols} (the last byte of a row must be zero-padded)")


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The bool [rows, cols] tensor of a packed mask; ValueError when the width or the padding bits are wrong."""
    _check_packed(packed, cols)
    rows = packed.shape[0]
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols, dtype=torch.bool)
    bits = torch.index_select(_BYTE_BITS, 0, packed.cpu().reshape(-1).int())
    return bits.view(rows, -1)[:, :cols].contiguous()


def row_counts(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Set bits per row of a packed mask (int64 [rows]), without unpacking it; checks it as :func:`unpack_mask`."""
    _check_packed(packed, cols)
    if packed.numel() == 0:
        return torch.zeros(packed.shape[0], dtype=torch.int64)
    return _POPCOUNT[packed.cpu().long()].sum(1)


def stored_bits(weight: torch.Tensor) -> torch.Tensor:
    """Bool tensor: True where the weight's bit pattern is non-zero (what a packed weight stores; -0.0 counts)."""
    return weight.detach().contiguous().view(_AS_INT[weight.element_size()]) != 0


def stored_count(weight: torch.Tensor) -> int:
    """Weights with a non-zero bit pattern (what the packed form stores; -0.0 counts)."""
    return int(torch.count_nonzero(weight.detach().view(_AS_INT[weight.element_size()])))


def packed_bytes(rows: int, cols: int, nnz: int, itemsize: int) -> int:
    """Bytes of a packed [rows, cols] weight: the 1-bit mask (rows padded to whole bytes) plus nnz values."""
    return rows * math.ceil(cols / 8) + nnz * itemsize


def break_even_sparsity(itemsize: int) -> float:
    """Sparsity above which packing saves bytes: 1/(8 * itemsize) (3.1% for fp32, 6.25% for bf16)."""
    return 1.0 / (8 * itemsize)


def row_scales(weight: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """The int8 scale of each row: max |W[o, stored]| / 127 (1 for a row with nothing stored)."""
    w = weight.detach().float()
    if w.shape[1] == 0:
        return torch.ones(w.shape[0])
    amax = torch.where(stored, w.abs(), torch.zeros_like(w)).amax(dim=1)
    return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).contiguous()


def round_codes(weight: torch.Tensor, stored: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes (as floats) of ``weight`` [rows, k] at ``scales`` [rows]: round to nearest, clamped to [-127, 127]; a
    stored weight that would round to 0 gets ±1 of its sign (a stored -0.0 stays 0), an entry not stored 0."""
    w = weight.detach().float()
    q = torch.round(w / scales[:, None]).clamp_(-127, 127)
    sign = torch.where(torch.signbit(w), -1.0, 1.0)
    q = torch.where(stored & (q == 0) & (w != 0), sign, q)
    return torch.where(stored, q, torch.zeros_like(q))


def quantize_rows(weight: torch.Tensor, stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scales float32 [out]): symmetric round-to-nearest with one scale per row,
    scale = max |W[o, :]| / 127, q = round(W / scale) clamped to [-127, 127]. A stored weight that would round to
    0 gets the code ±1 of its sign, so the set of stored weights (the mask, every row's and N:M group's count) is
    exactly the unquantised one; entries not ``stored`` are 0."""
    scales = row_scales(weight, stored)
    return round_codes(weight, stored, scales).to(torch.int8), scales
