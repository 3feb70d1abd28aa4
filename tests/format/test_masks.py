"""Pruning masks on disk (secateurs.format.masks, and masks= of save_pruned / save_sparse): bit-exact round
trips at odd widths, one clear error for every kind of damaged file, and the masks of a saved pruned model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_main
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sparse_models import partial_dirs, pruned_tiny

import secateurs
from secateurs.checkpoint import load_masks as load_model_masks
from secateurs.checkpoint import save_pruned, save_sparse
from secateurs.errors import SecateursError
from secateurs.format.masks import MASKS_NAME, load_masks, save_masks
from secateurs.models import decoder_linears, weight_view

WIDTHS = [1, 7, 9, 577]


def random_masks(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {f"layers.{i}.proj": torch.rand(3 + i, cols, generator=g) < 0.5 for i, cols in enumerate(WIDTHS)}
    masks["full"] = torch.ones(2, 9, dtype=torch.bool)
    masks["empty"] = torch.zeros(2, 9, dtype=torch.bool)
    return masks


# ------------------------------------------------------------------------------------------ round trip
def test_round_trip_is_bit_exact_at_odd_widths(tmp_path):
    masks = random_masks()
    path = save_masks(tmp_path, masks)
    assert path == tmp_path / MASKS_NAME
    back = load_masks(tmp_path)
    assert list(back) == list(masks)
    for name, mask in masks.items():
        assert back[name].dtype == torch.bool and torch.equal(back[name], mask), name
    with safe_open(path, "pt") as f:  # 1 bit per weight: ceil(cols / 8) bytes a row
        assert {k: tuple(f.get_tensor(k).shape) for k in f.keys()} == {
            k: (m.shape[0], (m.shape[1] + 7) // 8) for k, m in masks.items()
        }
        assert f.get_tensor("full").dtype == torch.uint8
    assert not partial_dirs(tmp_path)


def test_file_path_and_empty_dict(tmp_path):
    masks = {"a": torch.tensor([[True, False, True]])}
    path = save_masks(tmp_path / "sub" / "mine.safetensors", masks)
    assert path == tmp_path / "sub" / "mine.safetensors"
    assert torch.equal(load_masks(path)["a"], masks["a"])
    save_masks(tmp_path / "e", {})
    assert load_masks(tmp_path / "e") == {}


@pytest.mark.parametrize(
    "masks, message",
    [
        ({"a": torch.zeros(2, 3)}, "2-D bool tensor"),
        ({"a": torch.zeros(3, dtype=torch.bool)}, "2-D bool tensor"),
        ({"": torch.zeros(2, 3, dtype=torch.bool)}, "non-empty string"),
        ([torch.zeros(2, 3, dtype=torch.bool)], "must be a dict"),
    ],
)
def test_save_refuses_what_is_not_a_mask(tmp_path, masks, message):
    with pytest.raises(SecateursError, match=message):
        save_masks(tmp_path, masks)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ damaged files
def rewrite(path, edit):
    """Rewrite the masks file through ``edit(tensors, metadata, entries)``."""
    with safe_open(path, "pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(path)
    entries = json.loads(metadata["masks"])
    edit(tensors, metadata, entries)
    metadata["masks"] = json.dumps(entries)
    save_file(tensors, path, metadata=metadata)


NAME = "layers.2.proj"  # [5, 9]: 2 bytes a row, 7 padding bits


def _flip(t, entries):
    t[NAME][0, 0] ^= 1


DAMAGE = {
    "wrong dtype": (lambda t, m, e: t.update({NAME: t[NAME].to(torch.int16)}), "is torch.int16 [5, 2]"),
    "rows in metadata": (lambda t, m, e: e[NAME].update(shape=[6, 9]), "metadata says torch.uint8 [6, 2]"),
    "cols in metadata": (lambda t, m, e: e[NAME].update(shape=[5, 17]), "metadata says torch.uint8 [5, 3]"),
    "shape not a pair": (lambda t, m, e: e[NAME].update(shape=[5]), "malformed metadata for mask"),
    "negative shape": (lambda t, m, e: e[NAME].update(shape=[5, -9]), "malformed metadata for mask"),
    "count": (lambda t, m, e: _flip(t, e), "pruned weights, metadata says"),
    "padding bits": (lambda t, m, e: t[NAME].__setitem__((0, 1), t[NAME][0, 1] | 0x80), "bits set past column 9"),
    "missing entry": (lambda t, m, e: e.pop(NAME), f"masks and metadata disagree on {NAME}"),
    "missing tensor": (lambda t, m, e: t.pop(NAME), f"masks and metadata disagree on {NAME}"),
    "format": (lambda t, m, e: m.update(format="other"), "is not a secateurs-masks file"),
    "version": (lambda t, m, e: m.update(format_version="2"), "version '2'"),
    "metadata json": (lambda t, m, e: m.update(masks="{nope"), "'masks' is missing or not valid JSON"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_file_is_one_clear_error(tmp_path, case):
    path = save_masks(tmp_path, random_masks())
    edit, message = DAMAGE[case]
    if case == "metadata json":  # written as it is, not re-encoded
        with safe_open(path, "pt") as f:
            metadata = dict(f.metadata())
        edit(None, metadata, None)
        save_file(load_file(path), path, metadata=metadata)
    else:
        rewrite(path, edit)
    with pytest.raises(SecateursError) as info:
        load_masks(path)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_truncated_garbage_and_missing_files(tmp_path):
    path = save_masks(tmp_path, random_masks())
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], data[:-1], b"\x00" * 100, b""):
        path.write_bytes(damaged)
        with pytest.raises(SecateursError, match="truncated or corrupt") as info:
            load_masks(path)
        assert "\n" not in str(info.value)
    with pytest.raises(SecateursError, match="no pruning masks at"):
        load_masks(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ saved models
def model_masks(model) -> dict[str, torch.Tensor]:
    return {name: weight_view(m) == 0 for name, m in decoder_linears(model).items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("save_format", ["hf", "sparse"])
def test_pruned_model_saved_with_masks_gives_them_back(tmp_path, family, save_format):
    model = pruned_tiny(family)
    masks = model_masks(model)
    save_pruned(model, None, tmp_path / "out", {"sparsity": 0.7}, save_format=save_format, masks=masks)
    back = load_model_masks(tmp_path / "out")
    assert back.keys() == masks.keys()
    assert all(torch.equal(back[name], masks[name]) for name in masks)
    assert secateurs.load_masks(tmp_path / "out").keys() == masks.keys()
    assert 0.65 < sum(int(m.sum()) for m in back.values()) / sum(m.numel() for m in back.values()) < 0.75


def test_save_sparse_and_compress_keep_the_masks(tmp_path, tiny_model_dir):
    model, tokenizer, _ = secateurs.load_model(str(tiny_model_dir))
    secateurs.prune(model, secateurs.Recipe(method="magnitude", sparsity=0.6), progress=False)
    masks = model_masks(model)
    save_sparse(model, tokenizer, tmp_path / "s", masks=masks, progress=False)
    assert all(torch.equal(load_model_masks(tmp_path / "s")[k], masks[k]) for k in masks)
    save_pruned(model, tokenizer, tmp_path / "hf", masks=masks)
    code, _, err = run_main("compress", tmp_path / "hf", "-o", tmp_path / "c", "--quiet")
    assert code == 0, err
    assert all(torch.equal(load_model_masks(tmp_path / "c")[k], masks[k]) for k in masks)


def test_masks_that_do_not_fit_the_model_are_refused_before_writing(tmp_path):
    model = pruned_tiny("llama")
    masks = model_masks(model)
    name = next(iter(masks))
    bad = {
        "not a linear": ({**masks, "model.norm": torch.zeros(64, 64, dtype=torch.bool)}, "does not name a linear"),
        "shape": ({**masks, name: masks[name][:, :-1]}, "the linear's weight is"),
        "dtype": ({**masks, name: masks[name].float()}, "2-D bool tensor"),
    }
    for case, (value, message) in bad.items():
        for save_format in ("hf", "sparse"):
            with pytest.raises(SecateursError, match=message):
                save_pruned(model, None, tmp_path / "x", save_format=save_format, masks=value)
            assert list(tmp_path.iterdir()) == [], case


def test_folder_saved_without_masks(tmp_path):
    save_pruned(pruned_tiny("llama"), None, tmp_path / "plain")
    with pytest.raises(SecateursError, match="has no masks.safetensors"):
        load_model_masks(tmp_path / "plain")
    with pytest.raises(SecateursError, match="is not a folder"):
        load_model_masks(tmp_path / "missing")


def test_packed_masks_are_written_without_unpacking_and_read_back_equal(tmp_path):
    from secateurs.oneshot.result import PackedMask

    torch.manual_seed(0)
    masks = {"a.linear": torch.rand(5, 13) < 0.4, "b.linear": torch.rand(3, 8) < 0.5}
    save_masks(tmp_path / "bool", masks)
    save_masks(tmp_path / "packed", {n: PackedMask.pack(m) for n, m in masks.items()})
    for folder in ("bool", "packed"):
        loaded = load_masks(tmp_path / folder)
        assert loaded.keys() == masks.keys() and all(torch.equal(loaded[n], masks[n]) for n in masks)
    bad = PackedMask.pack(masks["a.linear"])
    bad.shape = (5, 30)
    with pytest.raises(SecateursError, match="packed mask 'a.linear' does not match its shape"):
        save_masks(tmp_path / "bad", {"a.linear": bad})
