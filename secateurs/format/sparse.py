"""The compact sparse checkpoint file, ``model.sparse.safetensors`` (format ``secateurs-sparse``, version 1).

Every tensor that is not packed is stored dense under its usual name, and each packed weight ``NAME`` becomes

- ``NAME.mask``: uint8 [out, ceil(in/8)]; bit j % 8 (LSB first) of byte j // 8 of row o is set iff W[o, j] is stored;
- ``NAME.values``: 1-D, the stored weights of W in row-major order, in the weight's dtype; or int8 codes, with
- ``NAME.scales``: float32 [out], one per row: W[o, j] = scales[o] * values (``secateurs compress --values int8``;
  symmetric round-to-nearest, every stored weight kept non-zero, so the mask is the unquantised one).

W is [out, in], the matrix the layer multiplies with (y = x @ W.T); GPT-2's Conv1D keeps its weight transposed
[in, out], which the metadata records; a convolution's weight [out, in, *kernel] is packed as the matrix
[out, in * prod(kernel)] with its full shape recorded as ``view``. A weight is stored iff its bit pattern is
non-zero, so -0.0 survives and loading gives bit-identical weights. The safetensors metadata names the format
and version and describes every packed tensor (shape as the model holds it, dtype, nnz, orientation, and the
SHA-256 of its parts, checked on load: about 0.4 s for the 340 MB of SmolLM2 at 50% on 2 cores; files written
before it have none and load as before) and every tied name, so nothing depends on the reader's guesswork.
Reading validates all of it and raises one clear :class:`SecateursError` otherwise.

A model too big to gather in memory (``secateurs prune --low-memory --save-format sparse``) is written sharded
instead: ``model-0000i-of-0000n.sparse.safetensors``, each a complete file of this format for the tensors it holds
(its own ``packed`` metadata; a tied name among the aliases of the file holding its source), plus
``model.sparse.safetensors.index.json``: ``{"metadata": {"format", "format_version", "dtype"}, "weight_map":
{name: file}}``, where a packed weight is listed under its weight's name and a tied name under the file recording
it. Readers take either form (:func:`open_folder`): every shard is checked as a single file is, the index must
name exactly what each file holds (no name in two files), and the model's tensors must all be found across them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from secateurs.errors import SecateursError
from secateurs.format.bits import pack_mask, packed_width, quantize_rows, row_counts, stored_bits, unpack_mask

FORMAT = "secateurs-sparse"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.sparse.safetensors"
INDEX_NAME = "model.sparse.safetensors.index.json"  # the sharded form: shard files named by shard_name()
# beside the weights of a plain PyTorch module (no config.json): its class name and, for the models secateurs
# defines, the architecture record that rebuilds it (a registered name and plain arguments; never code)
MODULE_NAME = "module.json"
MODULE_FORMAT = "secateurs-module"
PACKABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VALUE_DTYPES = {**PACKABLE_DTYPES, "int8": torch.int8}  # int8 values come with per-row float32 scales


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``: how the metadata names a dtype."""
    return str(dtype).removeprefix("torch.")


def _checked_codes(weight: torch.Tensor, bits: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor):
    """(codes, scales) on the CPU, once they fit ``weight`` [out, in] and give nothing to an entry not stored."""
    if codes.shape != weight.shape or codes.dtype != torch.int8 or scales.shape != (weight.shape[0],):
        raise SecateursError(
            f"int8 codes {tuple(codes.shape)} {codes.dtype} and scales {tuple(scales.shape)} do not fit a weight "
            f"of shape {tuple(weight.shape)}"
        )
    codes = codes.cpu()
    if bool(codes[~bits].any()):
        raise SecateursError("int8 codes give a value to a weight the mask does not store")
    return codes, scales.float().cpu().contiguous()


@dataclass(frozen=True, eq=False)
class PackedTensor:
    """One packed weight as the file stores it: W [out, in] as its bitmask plus exactly its nnz stored values.

    ``transposed``: the model holds W.T (a GPT-2 style Conv1D), so the tensor it loads is [in, out].
    ``view``: the shape the model holds when it is not a matrix (a convolution's [out, in, *kernel]; W is then
    [out, in * prod(kernel)]), else None.
    """

    mask: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]
    transposed: bool = False
    view: tuple[int, ...] | None = None
    scales: torch.Tensor | None = None  # float32 [out] when values are int8 codes

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        transposed: bool = False,
        values: str | None = None,
        codes: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> PackedTensor:
        """Pack a CPU weight: W [out, in], or a convolution's [out, in, *kernel] as [out, in * prod(kernel)]; keep
        the entries whose bit pattern is non-zero. ``values="int8"``: as int8 codes with per-row scales, rounded to
        nearest, or ``codes`` = (int8 codes [out, in], float32 scales [out]) chosen elsewhere (e.g.
        :func:`secateurs.oneshot.quantize.gptq_codes`; 0 wherever the weight stores nothing)."""
        weight = weight.detach().contiguous()
        view = None
        if weight.dim() > 2:
            view = tuple(int(n) for n in weight.shape)
            weight = weight.reshape(weight.shape[0], -1)
        bits = stored_bits(weight)
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        if values == "int8":
            q, scales = quantize_rows(weight, bits) if codes is None else _checked_codes(weight, bits, *codes)
            return cls(pack_mask(bits), q[bits], shape, transposed, view, scales)
        if values not in (None, dtype_name(weight.dtype)) or codes is not None:
            raise SecateursError(f"values must be int8 or the weight's own dtype, not {values!r}")
        return cls(pack_mask(bits), weight[bits], shape, transposed, view)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def held_shape(self) -> tuple[int, ...]:
        """The shape of the tensor the model holds: [out, in], [in, out] when transposed, or the view."""
        if self.view is not None:
            return self.view
        return self.shape[::-1] if self.transposed else self.shape

    def to_dense(self) -> torch.Tensor:
        """W [out, in], bit-identical to what was packed (entries not stored are +0.0); int8 codes dequantised to
        float32 scales * q."""
        if self.scales is not None:
            dense = torch.zeros(self.shape, dtype=torch.float32)
            dense.masked_scatter_(unpack_mask(self.mask, self.shape[1]), self.values.float())
            return dense * self.scales[:, None]
        dense = torch.zeros(self.shape, dtype=self.values.dtype)
        dense.masked_scatter_(unpack_mask(self.mask, self.shape[1]), self.values)
        return dense

    def to_held(self) -> torch.Tensor:
        """The tensor as the model holds it (contiguous): W, W.T for a transposed weight, or W in its view."""
        W = self.to_dense()
        if self.view is not None:
            return W.reshape(self.view)
        return W.t().contiguous() if self.transposed else W

    def digest(self) -> str:
        """SHA-256 of the mask, values (and scales) bytes: stored in the metadata, checked on load, so a damaged
        or tampered packed tensor is found even when its parts still agree with each other."""
        h = hashlib.sha256()
        for t in (self.mask, self.values, self.scales):
            if t is not None and t.numel():
                h.update(t.detach().contiguous().view(torch.uint8).numpy())
        return h.hexdigest()

    def entry(self) -> dict:
        """Its metadata: the matrix's shape as the model holds it, orientation, dtype, nnz and checksum (and the
        view)."""
        entry = {
            "shape": list(self.shape[::-1] if self.transposed else self.shape),
            "transposed": self.transposed,
            "dtype": dtype_name(self.values.dtype),
            "nnz": self.nnz,
            "sha256": self.digest(),
        }
        if self.view is not None:
            entry["view"] = list(self.view)
        if self.scales is not None:
            entry["scales"] = True
        return entry


# ------------------------------------------------------------------------------------------------------ write
def write_sparse(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor | PackedTensor],
    aliases: Mapping[str, str],
    dtype: torch.dtype,
) -> None:
    """Write ``tensors`` (dense ones, and packed weights by their weight's name) to one safetensors file.

    ``aliases`` maps a tied name to the name it shares memory with (stored once); ``dtype`` is the model's.
    """
    flat: dict[str, torch.Tensor] = {}
    packed: dict[str, dict] = {}
    for key, t in tensors.items():
        if isinstance(t, PackedTensor):
            flat[f"{key}.mask"] = t.mask
            flat[f"{key}.values"] = t.values
            if t.scales is not None:
                flat[f"{key}.scales"] = t.scales.float().contiguous()
            packed[key] = t.entry()
        else:
            flat[key] = t
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "dtype": dtype_name(dtype),
        "packed": json.dumps(packed, sort_keys=True),
        "aliases": json.dumps(dict(aliases), sort_keys=True),
    }
    safetensors.torch.save_file(flat, path, metadata=metadata)


def shard_name(number: int, total: int) -> str:
    """``model-0000i-of-0000n.sparse.safetensors``: the name of shard ``number`` (from 1) of ``total``."""
    return f"model-{number:05d}-of-{total:05d}.sparse.safetensors"


def write_index(folder: str | Path, weight_map: Mapping[str, str], dtype: torch.dtype) -> None:
    """Write the index of a sharded checkpoint: ``weight_map`` names the file holding each tensor (a packed weight by
    its weight's name, a tied name by the file whose aliases record it)."""
    index = {
        "metadata": {"format": FORMAT, "format_version": str(FORMAT_VERSION), "dtype": dtype_name(dtype)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (Path(folder) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------------- read
def is_sparse_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a sparse checkpoint's weights file, or the index of a sharded one."""
    folder = Path(folder)
    return (folder / WEIGHTS_NAME).is_file() or (folder / INDEX_NAME).is_file()


@dataclass(frozen=True)
class SparseHeader:
    """What the file's header says: its tensor names, the model's dtype name, packed entries and aliases."""

    keys: list[str]
    dtype: str | None
    packed: dict
    aliases: dict


def _json_field(metadata: dict, field: str, path: Path):
    try:
        value = json.loads(metadata[field])
    except (KeyError, TypeError, ValueError):
        raise SecateursError(f"{path}: metadata field {field!r} is missing or not valid JSON") from None
    if not isinstance(value, dict):
        raise SecateursError(f"{path}: metadata field {field!r} must be a JSON object")
    return value


def read_header(path: str | Path) -> SparseHeader:
    """The validated header of a sparse weights file (format and version checked)."""
    path = Path(path)
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
    except (safetensors.SafetensorError, OSError) as exc:
        raise SecateursError(f"cannot read {path}: {exc} (truncated or corrupt file?)") from None
    if metadata.get("format") != FORMAT:
        raise SecateursError(f"{path} is not a {FORMAT} checkpoint (metadata format {metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise SecateursError(
            f"{path} is {FORMAT} version {version!r}; this secateurs reads version {FORMAT_VERSION} "
            "(upgrade secateurs for newer checkpoints)"
        )
    return SparseHeader(
        keys=keys,
        dtype=metadata.get("dtype"),
        packed=_json_field(metadata, "packed", path),
        aliases=_json_field(metadata, "aliases", path),
    )


def _check_entry(key: str, entry, path: Path) -> tuple[tuple[int, int], bool, torch.dtype, int, tuple | None]:
    """Validate one packed entry of the metadata: (matrix shape as held, transposed, dtype, nnz, view or None)."""
    bad = SecateursError(f"{path}: malformed metadata for packed tensor {key!r}: {entry!r}")
    if not isinstance(entry, dict):
        raise bad
    shape, transposed, dtype, nnz = entry.get("shape"), entry.get("transposed"), entry.get("dtype"), entry.get("nnz")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        or not isinstance(transposed, bool)
        or not isinstance(dtype, str)
        or dtype not in VALUE_DTYPES
        or entry.get("scales", False) is not (dtype == "int8")
        or not isinstance(nnz, int)
        or isinstance(nnz, bool)
        or not 0 <= nnz <= shape[0] * shape[1]
    ):
        raise bad
    digest = entry.get("sha256")
    if digest is not None and not (
        isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    ):
        raise bad
    view = entry.get("view")
    if view is not None:
        if (
            transposed
            or not isinstance(view, list)
            or len(view) < 3
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in view)
            or view[0] != shape[0]
            or math.prod(view) != shape[0] * shape[1]
        ):
            raise bad
        view = tuple(view)
    return (shape[0], shape[1]), transposed, VALUE_DTYPES[dtype], nnz, view


def read_packed(f, path: Path, keys: set[str], key: str, entry) -> PackedTensor:
    """Packed weight ``key`` of the open file ``f`` (``keys``: the names it holds), checked against its metadata
    ``entry``: parts present with the shapes and dtypes it gives, mask and values agreeing, the checksum matching."""

    def shape_error(name, got, want):
        return SecateursError(f"{path}: {name} is {got}, the model expects {want}")

    shape, transposed, value_dtype, nnz, view = _check_entry(key, entry, path)
    parts = ("mask", "values", "scales") if value_dtype == torch.int8 else ("mask", "values")
    for part in parts:
        if f"{key}.{part}" not in keys:
            raise SecateursError(f"{path}: {key}.{part} is missing")
    rows, cols = shape[::-1] if transposed else shape
    mask, values = f.get_tensor(f"{key}.mask"), f.get_tensor(f"{key}.values")
    want = (torch.uint8, (rows, packed_width(cols)))
    if (mask.dtype, tuple(mask.shape)) != want:
        raise shape_error(f"{key}.mask", (mask.dtype, tuple(mask.shape)), want)
    if (values.dtype, tuple(values.shape)) != (value_dtype, (nnz,)):
        raise shape_error(f"{key}.values", (values.dtype, tuple(values.shape)), (value_dtype, (nnz,)))
    try:
        marked = int(row_counts(mask, cols).sum())
    except ValueError as exc:
        raise SecateursError(f"{path}: {key} is inconsistent: {exc}") from None
    if marked != nnz:
        raise SecateursError(
            f"{path}: {key} is inconsistent: mask marks {marked} stored weights but values holds {nnz}"
        )
    scales = None
    if value_dtype == torch.int8:
        scales = f.get_tensor(f"{key}.scales")
        if (scales.dtype, tuple(scales.shape)) != (torch.float32, (rows,)):
            raise shape_error(f"{key}.scales", (scales.dtype, tuple(scales.shape)), (torch.float32, (rows,)))
        if not bool(torch.isfinite(scales).all()):
            raise SecateursError(f"{path}: {key}.scales holds a value that is not finite")
    packed = PackedTensor(mask, values, (rows, cols), transposed, view, scales)
    digest = entry.get("sha256")
    if digest is not None and digest != packed.digest():
        raise SecateursError(f"{path}: {key} does not match its checksum (the file is damaged or was altered)")
    return packed


def packed_parts(header: SparseHeader) -> set[str]:
    """The file's tensor names that are parts of packed weights (``NAME.mask``, ``NAME.values``, ``NAME.scales``)."""
    return {f"{k}.{part}" for k in header.packed for part in ("mask", "values", "scales")}


def read_tensors(
    path: str | Path, header: SparseHeader, expected: Mapping[str, tuple[int, ...]], *, complete: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, PackedTensor]]:
    """(dense tensors, packed weights) of the file, checked against ``expected`` (every name the model holds ->
    its shape): each tensor belongs to the model with its shape, the packed parts agree with their metadata and
    with each other, aliases point at stored tensors, and (``complete``, a file holding the whole model) nothing
    the model needs is missing."""
    path = Path(path)
    keys = set(header.keys)

    def shape_error(key, got, want):
        return SecateursError(f"{path}: {key} is {got}, the model expects {want}")

    dense: dict[str, torch.Tensor] = {}
    packed: dict[str, PackedTensor] = {}
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            for key, entry in header.packed.items():
                shape, _, _, _, view = _check_entry(key, entry, path)
                if key not in expected or not key.endswith(".weight"):
                    raise SecateursError(f"{path}: packed tensor {key} is not a weight of this model")
                held = view or shape
                if tuple(expected[key]) != held:
                    raise shape_error(key, f"shape {list(held)}", list(expected[key]))
                packed[key] = read_packed(f, path, keys, key, entry)
            parts = packed_parts(header)
            for key in header.keys:
                if key in parts:
                    continue
                if key not in expected or key in header.packed:
                    raise SecateursError(f"{path}: tensor {key} is not part of this model")
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(expected[key]):
                    raise shape_error(key, f"shape {list(t.shape)}", list(expected[key]))
                dense[key] = t
    except safetensors.SafetensorError as exc:
        raise SecateursError(f"cannot read {path}: {exc} (truncated or corrupt file?)") from None
    for key, source in header.aliases.items():
        if key not in expected or not isinstance(source, str) or source not in dense:
            raise SecateursError(f"{path}: bad tied tensor {key!r} -> {source!r}")
    if complete:
        _check_complete(path, expected, [*dense, *header.aliases, *header.packed])
    return dense, packed


def _check_complete(where, expected: Mapping[str, tuple[int, ...]], found) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise SecateursError(f"{where} lacks tensors the model needs: {', '.join(missing[:5])}{more}")


# ------------------------------------------------------------------------------------- a folder, sharded or not
def held_names(header: SparseHeader) -> list[str]:
    """The model's tensor names a file holds: its dense tensors, its packed weights (by weight name), its aliases."""
    parts = packed_parts(header)
    return [k for k in header.keys if k not in parts] + list(header.packed) + list(header.aliases)


@dataclass(frozen=True)
class SparseFolder:
    """The weights files of a sparse folder with their validated headers: one ``model.sparse.safetensors``, or the
    shards its index names (``weight_map`` then gives the file of every name, else None)."""

    folder: Path
    files: list[tuple[Path, SparseHeader]]
    weight_map: dict[str, str] | None
    dtype: str | None

    @property
    def aliases(self) -> dict[str, str]:
        return {k: v for _, header in self.files for k, v in header.aliases.items()}

    @property
    def nbytes(self) -> int:
        return sum(path.stat().st_size for path, _ in self.files)


def _read_index(path: Path) -> tuple[dict[str, str], str | None]:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SecateursError(f"cannot read {path}: {exc}") from None
    metadata = index.get("metadata") if isinstance(index, dict) else None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if (
        not isinstance(metadata, dict)
        or not isinstance(weight_map, dict)
        or not all(isinstance(v, str) and v and "/" not in v and "\\" not in v for v in weight_map.values())
    ):
        raise SecateursError(f"{path} is not a sparse index (metadata and a weight_map of name -> file in the folder)")
    if metadata.get("format") != FORMAT:
        raise SecateursError(f"{path} is not a {FORMAT} index (metadata format {metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise SecateursError(
            f"{path} is {FORMAT} version {metadata.get('format_version')!r}; this secateurs reads version "
            f"{FORMAT_VERSION} (upgrade secateurs for newer checkpoints)"
        )
    return weight_map, metadata.get("dtype")


def open_folder(folder: str | Path) -> SparseFolder:
    """The weights files of a sparse folder, every header read and checked; for a sharded one, the index checked
    against them: every file it names present, each naming exactly what the index places there, none twice."""
    folder = Path(folder)
    single = folder / WEIGHTS_NAME
    if single.is_file():
        header = read_header(single)
        return SparseFolder(folder, [(single, header)], None, header.dtype)
    index = folder / INDEX_NAME
    if not index.is_file():
        raise SecateursError(f"{folder} is not a sparse checkpoint (no {WEIGHTS_NAME} or {INDEX_NAME})")
    weight_map, dtype = _read_index(index)
    files, where = [], {}
    for name in sorted(set(weight_map.values())):
        path = folder / name
        if not path.is_file():
            raise SecateursError(f"shard {path} named by {INDEX_NAME} is missing")
        header = read_header(path)
        if header.dtype != dtype:
            raise SecateursError(f"{path} holds a {header.dtype} model, {INDEX_NAME} says {dtype}")
        for key in held_names(header):
            if key in where:
                raise SecateursError(f"{key} is in two shards, {where[key]} and {name}")
            where[key] = name
        files.append((path, header))
    for key, name in weight_map.items():
        if where.get(key) != name:
            raise SecateursError(f"{INDEX_NAME} names tensor {key} in {name}, which does not hold it")
    extra = sorted(set(where) - set(weight_map))
    if extra:
        raise SecateursError(f"{where[extra[0]]} holds {extra[0]}, which {INDEX_NAME} does not name")
    return SparseFolder(folder, files, weight_map, dtype)


def read_folder(
    weights: SparseFolder, expected: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, torch.Tensor], dict[str, PackedTensor]]:
    """(dense tensors, packed weights) of every file of ``weights``, each checked as :func:`read_tensors` checks a
    file, and nothing the model needs missing from them all together."""
    if weights.weight_map is None:
        path, header = weights.files[0]
        return read_tensors(path, header, expected)
    dense: dict[str, torch.Tensor] = {}
    packed: dict[str, PackedTensor] = {}
    for path, header in weights.files:
        d, p = read_tensors(path, header, expected, complete=False)
        dense.update(d)
        packed.update(p)
    _check_complete(weights.folder, expected, [*dense, *weights.aliases, *packed])
    return dense, packed
