"""A compact checkpoint for pruned models: each sparse linear as a 1-bit mask plus its stored values.

The folder looks like a Hugging Face one (``config.json``, generation config, tokenizer files, ``report.json``)
but its weights are in ``model.sparse.safetensors``: every tensor that is not packed is stored dense under its
usual name, and each packed linear weight ``NAME`` becomes

- ``NAME.mask``: uint8 [out, ceil(in/8)]; bit j % 8 (LSB first) of byte j // 8 of row o is set iff W[o, j] is stored;
- ``NAME.values``: 1-D, the stored weights of W in row-major order, in the weight's dtype.

W is [out, in], the matrix the layer multiplies with (y = x @ W.T); GPT-2's Conv1D keeps its weight transposed
[in, out], which the metadata records. A weight is stored iff its bit pattern is non-zero, so -0.0 survives and
loading gives bit-identical weights. The safetensors metadata names the format and version and describes every
packed tensor (shape as the model holds it, dtype, nnz, orientation) and every tied name, so nothing depends on
the reader's guesswork. The weights file has its own name so that plain ``from_pretrained`` refuses the folder
instead of building a model with random weights; :func:`load_pruned` gives the plain model back.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.export import REPORT_NAME, AtomicFolder
from secateurs.models import find_layers, find_linears, weight_view

log = logging.getLogger(__name__)

FORMAT = "secateurs-sparse"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.sparse.safetensors"
PACKABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ----------------------------------------------------------------------------------------------------- sizes
def packed_bytes(rows: int, cols: int, nnz: int, itemsize: int) -> int:
    """Bytes of a packed [rows, cols] weight: the 1-bit mask (rows padded to whole bytes) plus nnz values."""
    return rows * math.ceil(cols / 8) + nnz * itemsize


def break_even_sparsity(itemsize: int) -> float:
    """Sparsity above which packing saves bytes: 1/(8 * itemsize) (3.1% for fp32, 6.25% for bf16)."""
    return 1.0 / (8 * itemsize)


def stored_count(weight: torch.Tensor) -> int:
    """Weights with a non-zero bit pattern (what the packed form stores; -0.0 counts)."""
    return int(torch.count_nonzero(weight.detach().view(_BITS[weight.element_size()])))


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D inside the decoder layers, by full module name."""
    layers_name, layers = find_layers(model)
    return {
        f"{layers_name}.{index}.{name}": module
        for index, layer in enumerate(layers)
        for name, module in find_linears(layer).items()
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _tensor_key(t: torch.Tensor):
    """Identity of a tensor's memory: tied parameters share it."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


# ------------------------------------------------------------------------------------------------------ save
def _entry(p, transposed: bool) -> dict:
    """Metadata of one packed weight: its shape as the model holds it, orientation, dtype and nnz."""
    return {
        "shape": list(p.shape[::-1] if transposed else p.shape),
        "transposed": transposed,
        "dtype": _dtype_name(p.dtype),
        "nnz": p.nnz,
    }


def _collect(model: nn.Module, min_sparsity: float | None, progress: bool):
    """What to write for ``model``: (tensors, packed metadata, aliases, byte counts, linears left dense)."""
    from tqdm.auto import tqdm

    from secateurs.runtime import kernels
    from secateurs.runtime.linear import SparseLinear

    state = model.state_dict()
    owners: dict = {}
    for key, t in state.items():
        owners.setdefault(_tensor_key(t), []).append(key)
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, dict] = {}
    sizes = dict.fromkeys(("linear_dense_bytes", "linear_checkpoint_bytes", "packed_dense_bytes", "packed_bytes"), 0)
    dense_linears = []

    def add_packed(name: str, p, transposed: bool) -> None:
        tensors[f"{name}.weight.mask"] = p.mask
        tensors[f"{name}.weight.values"] = p.values[: p.nnz].clone()  # no padding in the file
        packed[f"{name}.weight"] = _entry(p, transposed)
        dense = p.shape[0] * p.shape[1] * p.values.element_size()
        size = packed_bytes(*p.shape, p.nnz, p.values.element_size())
        for field, n in (("linear_dense_bytes", dense), ("linear_checkpoint_bytes", size)):
            sizes[field] += n
        sizes["packed_dense_bytes"] += dense
        sizes["packed_bytes"] += size

    # a model already converted by sparsify / load_sparse: its packed weights go as they are
    already = {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    for name, module in already.items():
        add_packed(name, module.packed, module.transposed)
    already_dense_bytes = sizes["packed_dense_bytes"]
    try:
        linears = decoder_linears(model)
    except SecateursError:
        if not already:
            raise
        linears = {}  # every decoder linear is already sparse
    for name, module in tqdm(linears.items(), desc="packing", unit="linear", disable=not progress, leave=False):
        W = weight_view(module)
        dense = W.numel() * W.element_size()
        nnz = stored_count(W)
        wanted = packed_bytes(*W.shape, nnz, W.element_size()) < dense and (
            min_sparsity is None or 1 - nnz / max(W.numel(), 1) >= min_sparsity
        )
        shared = len(owners.get(_tensor_key(module.weight), [])) > 1  # tied to another tensor: keep it whole
        packable = _dtype_name(W.dtype) in PACKABLE_DTYPES
        if wanted and not shared and packable:
            add_packed(name, kernels.pack(W.detach().cpu().contiguous()), not isinstance(module, nn.Linear))
            continue
        if wanted and not shared:
            log.warning("%s stays dense: packing needs float32 or bfloat16, not %s", name, _dtype_name(W.dtype))
        sizes["linear_dense_bytes"] += dense
        sizes["linear_checkpoint_bytes"] += dense
        dense_linears.append(name)
    # everything else dense, each tensor once: a name sharing another's memory (tied embeddings) is an alias
    aliases: dict[str, str] = {}
    first: dict = {}
    dense_total = already_dense_bytes  # the model written dense, for comparison
    for key, t in state.items():
        ident = _tensor_key(t)
        if ident is not None and ident in first:
            aliases[key] = first[ident]
            continue
        if ident is not None:
            first[ident] = key
        dense_total += t.numel() * t.element_size()
        if key not in packed:
            tensors[key] = t.detach().cpu().contiguous()
    sizes["dense_weights_bytes"] = dense_total
    return tensors, packed, aliases, sizes, dense_linears


def save_sparse(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    report: dict | None = None,
    *,
    overwrite: bool = False,
    min_sparsity: float | None = None,
    progress: bool = True,
) -> dict:
    """Write ``model`` as a compact sparse folder (atomically) and return what it saved, in bytes.

    Every decoder linear whose packed form is smaller than its dense one is packed (``min_sparsity``: only those
    at least this sparse); everything else, embeddings and LM head included, is stored dense; tied tensors once.
    """
    from safetensors.torch import save_file

    tensors, packed, aliases, sizes, dense_linears = _collect(model, min_sparsity, progress)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "dtype": _dtype_name(dtype),
        "packed": json.dumps(packed, sort_keys=True),
        "aliases": json.dumps(aliases, sort_keys=True),
    }
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = _dtype_name(dtype)
    try:
        with AtomicFolder(out_dir, overwrite) as tmp:
            config.save_pretrained(tmp)
            generation = getattr(model, "generation_config", None)
            if generation is not None:
                generation.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if report is not None:
                (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
            save_file(tensors, tmp / WEIGHTS_NAME, metadata=metadata)
            folder = _folder_bytes(tmp)
            weights_file = (tmp / WEIGHTS_NAME).stat().st_size
    except OSError as exc:
        raise SecateursError(f"cannot save to {out_dir}: {exc.strerror or exc}") from None
    summary = {
        "output": str(Path(out_dir)),
        "format": f"{FORMAT} v{FORMAT_VERSION}",
        "dtype": _dtype_name(dtype),
        "packed_linears": len(packed),
        "dense_linears": dense_linears,
        **sizes,
        "linear_ratio": sizes["linear_checkpoint_bytes"] / max(sizes["linear_dense_bytes"], 1),
        "packed_ratio": sizes["packed_bytes"] / max(sizes["packed_dense_bytes"], 1),
        "weights_file_bytes": weights_file,
        "folder_bytes": folder,
        # the same folder with the tensors written dense (as save_pretrained would, less its small header)
        "dense_folder_bytes": folder - weights_file + sizes["dense_weights_bytes"],
    }
    summary["folder_ratio"] = summary["folder_bytes"] / max(summary["dense_folder_bytes"], 1)
    _log_summary(summary)
    return summary


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _log_summary(s: dict) -> None:
    log.info(
        "decoder linear weights: %s packed vs %s dense (%.3fx; %d packed, %d dense)",
        _mb(s["linear_checkpoint_bytes"]),
        _mb(s["linear_dense_bytes"]),
        s["linear_ratio"],
        s["packed_linears"],
        len(s["dense_linears"]),
    )
    log.info(
        "whole folder: %s vs %s dense (%.3fx)", _mb(s["folder_bytes"]), _mb(s["dense_folder_bytes"]), s["folder_ratio"]
    )


# ------------------------------------------------------------------------------------------------------ read
def is_sparse_folder(folder: str | Path) -> bool:
    return (Path(folder) / WEIGHTS_NAME).is_file()


def _json_field(metadata: dict, field: str, path: Path):
    try:
        value = json.loads(metadata[field])
    except (KeyError, TypeError, ValueError):
        raise SecateursError(f"{path}: metadata field {field!r} is missing or not valid JSON") from None
    if not isinstance(value, dict):
        raise SecateursError(f"{path}: metadata field {field!r} must be a JSON object")
    return value


def _check_entry(key: str, entry, path: Path) -> tuple[tuple[int, int], bool, torch.dtype, int]:
    """Validate one packed entry of the metadata: (shape as held, transposed, dtype, nnz)."""
    bad = SecateursError(f"{path}: malformed metadata for packed tensor {key!r}: {entry!r}")
    if not isinstance(entry, dict):
        raise bad
    shape, transposed, dtype, nnz = entry.get("shape"), entry.get("transposed"), entry.get("dtype"), entry.get("nnz")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        or not isinstance(transposed, bool)
        or dtype not in PACKABLE_DTYPES
        or not isinstance(nnz, int)
        or isinstance(nnz, bool)
        or not 0 <= nnz <= shape[0] * shape[1]
    ):
        raise bad
    return (shape[0], shape[1]), transposed, PACKABLE_DTYPES[dtype], nnz


def _header(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise SecateursError(f"cannot read {path}: {exc} (truncated or corrupt file?)") from None
    if metadata.get("format") != FORMAT:
        raise SecateursError(f"{path} is not a {FORMAT} checkpoint (metadata format {metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise SecateursError(
            f"{path} is {FORMAT} version {version!r}; this secateurs reads version {FORMAT_VERSION} "
            "(upgrade secateurs for newer checkpoints)"
        )
    return {
        "keys": keys,
        "dtype": metadata.get("dtype"),
        "packed": _json_field(metadata, "packed", path),
        "aliases": _json_field(metadata, "aliases", path),
    }


def _skeleton(folder: Path, dtype: torch.dtype):
    """The model built from its config with every parameter on the meta device (no memory for weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SecateursError(f"cannot build the model of {folder} from its config.json: {first}") from None


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._parameters:
        module._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
    else:
        module._buffers[attr] = value


def read_sparse(folder: str | Path, dtype: str | torch.dtype | None = None):
    """(model, packed, tokenizer): the model of a sparse folder with every non-packed tensor loaded, and its
    packed weights ``{module name: (PackedWeight of W [out, in], transposed)}`` whose parameters are still on the
    meta device (the callers decide: dense back, or sparse modules).

    ``dtype`` converts floating tensors and packed values (then not bit-identical); None keeps the stored ones.
    """
    from safetensors import SafetensorError, safe_open

    from secateurs.models import resolve_dtype
    from secateurs.runtime import kernels

    folder = Path(folder).expanduser()
    path = folder / WEIGHTS_NAME
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise SecateursError(f"{folder} is not a model folder (no config.json)")
    if not path.is_file():
        raise SecateursError(f"{folder} is not a sparse checkpoint (no {WEIGHTS_NAME}; compress it first)")
    header = _header(path)
    dtype = resolve_dtype(dtype)
    dtype = None if dtype == "auto" else dtype
    stored = PACKABLE_DTYPES.get(header["dtype"]) or resolve_dtype(header["dtype"] or "float32")
    model = _skeleton(folder, dtype or stored)
    expected = {key: t for key, t in model.state_dict(keep_vars=True).items()}
    keys = set(header["keys"])

    def shape_error(key, got, want):
        return SecateursError(f"{path}: {key} is {got}, the model expects {want}")

    dense: dict[str, torch.Tensor] = {}
    packed: dict[str, tuple] = {}
    try:
        with safe_open(path, framework="pt") as f:
            for key, entry in header["packed"].items():
                shape, transposed, value_dtype, nnz = _check_entry(key, entry, path)
                if key not in expected or not key.endswith(".weight"):
                    raise SecateursError(f"{path}: packed tensor {key} is not a weight of this model")
                if tuple(expected[key].shape) != shape:
                    raise shape_error(key, f"shape {list(shape)}", list(expected[key].shape))
                for part in ("mask", "values"):
                    if f"{key}.{part}" not in keys:
                        raise SecateursError(f"{path}: {key}.{part} is missing")
                rows, cols = shape[::-1] if transposed else shape
                mask, values = f.get_tensor(f"{key}.mask"), f.get_tensor(f"{key}.values")
                want = (torch.uint8, (rows, math.ceil(cols / 8)))
                if (mask.dtype, tuple(mask.shape)) != want:
                    raise shape_error(f"{key}.mask", (mask.dtype, tuple(mask.shape)), want)
                if (values.dtype, tuple(values.shape)) != (value_dtype, (nnz,)):
                    raise shape_error(f"{key}.values", (values.dtype, tuple(values.shape)), (value_dtype, (nnz,)))
                if dtype is not None and dtype != value_dtype:
                    values = values.to(dtype)
                try:
                    p = kernels.from_parts(mask, values, (rows, cols))
                except ValueError as exc:
                    raise SecateursError(f"{path}: {key} is inconsistent: {exc}") from None
                packed[key.removesuffix(".weight")] = (p, transposed)
            packed_parts = {f"{k}.{part}" for k in header["packed"] for part in ("mask", "values")}
            for key in header["keys"]:
                if key in packed_parts:
                    continue
                if key not in expected or key in header["packed"]:
                    raise SecateursError(f"{path}: tensor {key} is not part of this model")
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(expected[key].shape):
                    raise shape_error(key, f"shape {list(t.shape)}", list(expected[key].shape))
                if dtype is not None and t.is_floating_point() and expected[key].is_floating_point():
                    t = t.to(dtype)
                dense[key] = t
    except SafetensorError as exc:
        raise SecateursError(f"cannot read {path}: {exc} (truncated or corrupt file?)") from None
    aliases = header["aliases"]
    for key, source in aliases.items():
        if key not in expected or source not in dense or not isinstance(source, str):
            raise SecateursError(f"{path}: bad tied tensor {key!r} -> {source!r}")
    missing = sorted(set(expected) - set(dense) - set(aliases) - set(header["packed"]))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise SecateursError(f"{path} lacks tensors the model needs: {', '.join(missing[:5])}{more}")
    model.load_state_dict(dense, strict=False, assign=True)
    for key, source in aliases.items():
        owner, _, attr = source.rpartition(".")
        module = model.get_submodule(owner)
        _set_tensor(model, key, module._parameters.get(attr, module._buffers.get(attr)))
    model.eval()
    _load_generation_config(model, folder)
    return model, packed, load_tokenizer(folder)


def _load_generation_config(model, folder: Path) -> None:
    if not (folder / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s/generation_config.json: %s", folder, exc)


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has none."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def check_loaded(model: nn.Module) -> nn.Module:
    """Refuse a model that still has a tensor on the meta device (a checkpoint that did not fill it)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise SecateursError(f"the checkpoint left {name} without a value")
    return model


def load_pruned(folder: str | Path, dtype: str | torch.dtype | None = None):
    """(model, tokenizer): a sparse folder back as a plain transformers model with dense, bit-identical weights."""
    from secateurs.runtime import kernels

    model, packed, tokenizer = read_sparse(folder, dtype)
    for name, (p, transposed) in packed.items():
        W = kernels.unpack(p)
        _set_tensor(model, f"{name}.weight", nn.Parameter(W.t().contiguous() if transposed else W))
    return check_loaded(model), tokenizer


# -------------------------------------------------------------------------------------------------- compress
def compress(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    min_sparsity: float | None = None,
    progress: bool = True,
) -> dict:
    """Rewrite a pruned Hugging Face folder (e.g. from ``secateurs prune``) as a sparse folder; returns the sizes."""
    from secateurs.models import load_model

    src = Path(src_dir).expanduser()
    if not (src / "config.json").is_file():
        raise SecateursError(f"{src} is not a Hugging Face model folder (no config.json)")
    if is_sparse_folder(src):
        raise SecateursError(f"{src} is already a sparse checkpoint")
    if Path(out_dir).expanduser().absolute() == src.absolute():
        raise SecateursError("the output folder must differ from the source")
    report = None
    if (src / REPORT_NAME).is_file():
        try:
            report = json.loads((src / REPORT_NAME).read_text())
        except (OSError, ValueError) as exc:
            log.warning("not copying %s: %s", src / REPORT_NAME, exc)
    model, tokenizer, _ = load_model(str(src))
    summary = save_sparse(
        model, tokenizer, out_dir, report, overwrite=overwrite, min_sparsity=min_sparsity, progress=progress
    )
    summary["source"] = str(src)
    summary["source_folder_bytes"] = _folder_bytes(src)
    summary["source_ratio"] = summary["folder_bytes"] / max(summary["source_folder_bytes"], 1)
    log.info("source folder %s: %s (%.3fx)", src, _mb(summary["source_folder_bytes"]), summary["source_ratio"])
    return summary


def add_parser(subparsers, name: str) -> None:
    """``secateurs compress SRC --output DST``: rewrite a pruned folder in the compact sparse format."""
    p = subparsers.add_parser(
        name,
        help="rewrite a pruned model folder in the compact sparse format (mask + non-zero values)",
        description="Rewrite a pruned Hugging Face folder as a sparse checkpoint: each decoder linear whose packed "
        "form is smaller is stored as a 1-bit mask plus its non-zero values; load it back with "
        "secateurs.load_sparse (sparse kernels) or secateurs.load_pruned (a plain dense model).",
    )
    p.add_argument("source", help="a pruned Hugging Face model folder")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="where to write the sparse folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument(
        "--min-sparsity",
        type=float,
        default=None,
        metavar="S",
        help="pack only linears at least this sparse (default: every linear whose packed form is smaller)",
    )
    p.add_argument("--json", action="store_true", help="print the sizes as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.set_defaults(run=_run)


def _run(args) -> dict:
    if args.min_sparsity is not None and not 0 <= args.min_sparsity <= 1:
        raise SecateursError(f"--min-sparsity must be in [0, 1], got {args.min_sparsity}")
    return compress(
        args.source, args.output, overwrite=args.overwrite, min_sparsity=args.min_sparsity, progress=not args.quiet
    )
