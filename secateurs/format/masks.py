"""Pruning masks on disk: ``masks.safetensors``, 1 bit per weight, a set bit meaning the weight was pruned.

One uint8 tensor per linear, named as the linear module (``model.layers.0.mlp.up_proj``), holding its bool
[out, in] mask packed as :mod:`secateurs.format.bits` describes. The metadata names the format and version and
gives every mask's shape and pruned count, so loading checks the file fully; nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from secateurs.errors import SecateursError
from secateurs.format.bits import pack_mask, packed_width, row_counts, unpack_mask
from secateurs.format.folder import replace_file

MASKS_NAME = "masks.safetensors"
MASKS_FORMAT = "secateurs-masks"
MASKS_VERSION = 1


def masks_path(folder_or_file: str | Path) -> Path:
    """The masks file of a folder (``folder/masks.safetensors``), or the path itself when it names a .safetensors."""
    path = Path(folder_or_file).expanduser()
    return path if path.suffix == ".safetensors" and not path.is_dir() else path / MASKS_NAME


def save_masks(folder_or_file: str | Path, masks: Mapping[str, torch.Tensor]) -> Path:
    """Write ``masks`` ({linear name: bool [out, in], True = pruned}, or already packed: objects with ``bits`` and
    ``shape`` such as a PackedMask) packed 1 bit per weight; returns the file.

    The file is written beside its final name and renamed into place, so it is either complete or absent.
    """
    if not isinstance(masks, Mapping):
        raise SecateursError(f"masks must be a dict of linear name -> bool tensor, not {type(masks).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, mask in masks.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise SecateursError(f"mask name must be a non-empty string naming a linear, got {name!r}")
        if not isinstance(mask, torch.Tensor) and hasattr(mask, "bits") and hasattr(mask, "shape"):
            shape = tuple(mask.shape)  # already packed (e.g. a PackedMask): written without unpacking
            try:
                pruned = int(row_counts(mask.bits, shape[1]).sum())
            except (ValueError, IndexError) as exc:
                raise SecateursError(f"packed mask {name!r} does not match its shape {list(shape)}: {exc}") from None
            tensors[name] = mask.bits.contiguous()
            entries[name] = {"shape": list(shape), "pruned": pruned}
            continue
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise SecateursError(f"mask {name!r} must be a 2-D bool tensor [out, in] (True = pruned), got {got}")
        tensors[name] = pack_mask(mask)
        entries[name] = {"shape": list(mask.shape), "pruned": int(mask.sum())}
    metadata = {
        "format": MASKS_FORMAT,
        "format_version": str(MASKS_VERSION),
        "masks": json.dumps(entries),  # in the order given: loading keeps it
    }
    path = masks_path(folder_or_file)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))
    except OSError as exc:
        raise SecateursError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _entry(path: Path, name: str, entry) -> tuple[int, int, int]:
    shape = entry.get("shape") if isinstance(entry, dict) else None
    pruned = entry.get("pruned") if isinstance(entry, dict) else None
    ints = [*shape, pruned] if isinstance(shape, list) else []
    if len(ints) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in ints):
        raise SecateursError(f"{path}: malformed metadata for mask {name!r}: {entry!r}")
    rows, cols = shape
    if pruned > rows * cols:
        raise SecateursError(f"{path}: malformed metadata for mask {name!r}: {entry!r}")
    return rows, cols, pruned


def load_masks(folder_or_file: str | Path) -> dict[str, torch.Tensor]:
    """The masks of a file written by :func:`save_masks`: {linear name: bool [out, in], True = pruned}.

    A missing, truncated or inconsistent file raises one :class:`SecateursError` saying what is wrong.
    """
    path = masks_path(folder_or_file)
    if not path.is_file():
        raise SecateursError(f"no pruning masks at {path}")
    masks: dict[str, torch.Tensor] = {}
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != MASKS_FORMAT:
                raise SecateursError(
                    f"{path} is not a {MASKS_FORMAT} file (metadata format {metadata.get('format')!r})"
                )
            version = metadata.get("format_version")
            if version != str(MASKS_VERSION):
                raise SecateursError(
                    f"{path} is {MASKS_FORMAT} version {version!r}; this secateurs reads version {MASKS_VERSION}"
                )
            try:
                entries = json.loads(metadata["masks"])
            except (KeyError, TypeError, ValueError):
                raise SecateursError(f"{path}: metadata field 'masks' is missing or not valid JSON") from None
            if not isinstance(entries, dict):
                raise SecateursError(f"{path}: metadata field 'masks' must be a JSON object")
            keys = set(f.keys())
            if keys != set(entries):
                odd = sorted(keys.symmetric_difference(entries))
                raise SecateursError(f"{path}: masks and metadata disagree on {', '.join(odd[:5])}")
            for name, entry in entries.items():
                rows, cols, pruned = _entry(path, name, entry)
                packed = f.get_tensor(name)
                want = (torch.uint8, (rows, packed_width(cols)))
                if (packed.dtype, tuple(packed.shape)) != want:
                    raise SecateursError(
                        f"{path}: mask {name!r} is {packed.dtype} {list(packed.shape)}, its metadata says "
                        f"{want[0]} {list(want[1])} for shape [{rows}, {cols}]"
                    )
                try:
                    marked = int(row_counts(packed, cols).sum())
                except ValueError as exc:
                    raise SecateursError(f"{path}: mask {name!r} is damaged: {exc}") from None
                if marked != pruned:
                    raise SecateursError(f"{path}: mask {name!r} marks {marked} pruned weights, metadata says {pruned}")
                masks[name] = unpack_mask(packed, cols)
    except (safetensors.SafetensorError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SecateursError(f"cannot read {path}: {first} (truncated or corrupt file?)") from None
    return masks
