"""Bit packing of boolean masks (secateurs.format.bits): the layout, odd widths, and damaged padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secateurs.format import bits


@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 7), (4, 8), (5, 9), (2, 577), (0, 5), (3, 0)])
def test_pack_unpack_round_trip_and_numpy_layout(rows, cols):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(cols)) < 0.5
    packed = bits.pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (cols + 7) // 8)
    want = np.packbits(mask.numpy(), axis=1, bitorder="little").reshape(rows, (cols + 7) // 8)
    assert packed.tolist() == want.tolist()  # the layout numpy calls little-endian bit order
    assert torch.equal(bits.unpack_mask(packed, cols), mask)
    assert bits.row_counts(packed, cols).tolist() == mask.sum(1).tolist()


def test_lsb_first():
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, [0, 3, 9]] = True
    assert bits.pack_mask(mask).tolist() == [[0b00001001, 0b00000010]]


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match="2-D bool"):
        bits.pack_mask(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="2-D bool"):
        bits.pack_mask(torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bits set past column 9"):
        bits.unpack_mask(torch.tensor([[0, 0b10]], dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="bits set past column 9"):
        bits.row_counts(torch.tensor([[0, 0b10]], dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="2 bytes per row, 17 columns need 3"):
        bits.unpack_mask(torch.zeros(1, 2, dtype=torch.uint8), 17)
    with pytest.raises(ValueError, match="2-D uint8"):
        bits.unpack_mask(torch.zeros(1, 2, dtype=torch.int16), 9)


def test_stored_bits_and_counts():
    W = torch.tensor([[0.0, -0.0, 1.0], [float("nan"), 0.0, 0.0]])
    assert bits.stored_bits(W).tolist() == [[False, True, True], [True, False, False]]
    assert bits.stored_count(W) == 3 and bits.stored_count(W.to(torch.bfloat16)) == 3
    assert bits.packed_bytes(8, 64, 8 * 62, 4) == 8 * 64 * 4
    assert bits.break_even_sparsity(2) == pytest.approx(1 / 16)
