"""The sparse checkpoint file (secateurs.format.sparse): layout, bytes, version-1 metadata, and bad files."""

from __future__ import annotations

import hashlib
import json
import math
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sparse_models import assert_bit_identical, bits, pruned_tiny

from secateurs.checkpoint import load_pruned, save_sparse
from secateurs.errors import SecateursError
from secateurs.format import sparse
from secateurs.format.sparse import WEIGHTS_NAME, PackedTensor
from secateurs.models import weight_view


# ------------------------------------------------------------------------------------------ layout
def test_version_1_file_layout_without_a_model(tmp_path):
    """The file as version 1 writes it: NAME.mask / NAME.values, dense tensors as they are, and the metadata."""
    W = torch.tensor([[0.0, 1.5, 0.0, -0.0, 0.0, 0.0, 0.0, 0.0, 2.0], [0.0] * 9, [3.0] * 9])
    conv = torch.tensor([[1.0, 0.0], [0.0, -2.0], [4.0, 0.0]])  # held [in=3, out=2]: W is its transpose
    tensors = {
        "a.weight": PackedTensor.from_weight(W),
        "c.weight": PackedTensor.from_weight(conv.t(), transposed=True),
        "norm.weight": torch.ones(3),
    }
    path = tmp_path / WEIGHTS_NAME
    sparse.write_sparse(path, tensors, {"tied.weight": "norm.weight"}, torch.float32)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert set(stored) == {"a.weight.mask", "a.weight.values", "c.weight.mask", "c.weight.values", "norm.weight"}
    # bit j % 8 of byte j // 8, LSB first; -0.0 is stored (its bits are not zero); padding bits are zero
    assert stored["a.weight.mask"].tolist() == [[0b00001010, 0b1], [0, 0], [0xFF, 0b1]]
    assert bits(stored["a.weight.values"]).tolist() == bits(torch.tensor([1.5, -0.0, 2.0] + [3.0] * 9)).tolist()
    assert stored["c.weight.mask"].tolist() == [[0b101], [0b010]] and stored["c.weight.values"].tolist() == [1, 4, -2]

    def sha(name):  # SHA-256 of the mask's bytes, then the values' bytes (little-endian float32)
        mask, values = stored[f"{name}.weight.mask"], stored[f"{name}.weight.values"]
        return hashlib.sha256(
            bytes(mask.flatten().tolist()) + struct.pack(f"<{values.numel()}f", *values.tolist())
        ).hexdigest()

    assert metadata == {
        "format": "secateurs-sparse",
        "format_version": "1",
        "dtype": "float32",
        "packed": json.dumps(
            {
                "a.weight": {"dtype": "float32", "nnz": 12, "shape": [3, 9], "transposed": False, "sha256": sha("a")},
                "c.weight": {"dtype": "float32", "nnz": 3, "shape": [3, 2], "transposed": True, "sha256": sha("c")},
            },
            sort_keys=True,
        ),
        "aliases": json.dumps({"tied.weight": "norm.weight"}),
    }
    header = sparse.read_header(path)
    expected = {"a.weight": (3, 9), "c.weight": (3, 2), "norm.weight": (3,), "tied.weight": (3,)}
    dense, packed = sparse.read_tensors(path, header, expected)
    assert set(dense) == {"norm.weight"} and set(packed) == {"a.weight", "c.weight"}
    assert torch.equal(bits(packed["a.weight"].to_held()), bits(W))
    assert torch.equal(packed["c.weight"].to_held(), conv) and packed["c.weight"].held_shape == (3, 2)
    with pytest.raises(SecateursError, match="the model expects"):
        sparse.read_tensors(path, header, {**expected, "a.weight": (9, 3)})
    with pytest.raises(SecateursError, match="lacks tensors the model needs: extra"):
        sparse.read_tensors(path, header, {**expected, "extra": (1,)})
    assert sparse.is_sparse_folder(tmp_path) and not sparse.is_sparse_folder(tmp_path / "nothing")


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


# ------------------------------------------------------------------------------------------ bad input
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
    # parts that still agree with each other (same popcount, same count of values), found by the checksum
    "mask bytes reordered": (lambda t, m: _reorder_mask(t[f"{KEY}.mask"]), "does not match its checksum"),
    "values swapped": (
        lambda t, m: t[f"{KEY}.values"].__setitem__(slice(0, 2), t[f"{KEY}.values"][[1, 0]]),
        "checksum",
    ),
    "checksum": (lambda t, m: _packed(m, lambda p: p[KEY].update(sha256="xyz")), "malformed metadata"),
}


def _reorder_mask(mask):
    """Swap two bytes of a row that differ but have the same number of set bits."""
    row = mask[0]
    for i in range(len(row)):
        for j in range(i + 1, len(row)):
            a, b = int(row[i]), int(row[j])
            if a != b and a.bit_count() == b.bit_count():
                row[i], row[j] = b, a
                return
    raise AssertionError("no two bytes to swap")


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
