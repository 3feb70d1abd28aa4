"""Save and load pruned models: a normal Hugging Face folder or the compact sparse one, and ``secateurs compress``.

Either way the folder gets the tokenizer, ``report.json`` and, when given, the pruning masks
(``masks.safetensors``, 1 bit per weight), all written atomically (see :mod:`secateurs.format.folder`). Reading
back (:func:`load_pruned`, :func:`load_masks`, :func:`read_sparse`) lives in :mod:`secateurs.loading`, below
model loading, and is re-exported here.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from secateurs import loading
from secateurs.errors import SecateursError
from secateurs.format.folder import REPORT_NAME, AtomicFolder, check_output, folder_bytes
from secateurs.format.masks import MASKS_NAME, save_masks
from secateurs.format.sparse import (
    FORMAT,
    FORMAT_VERSION,
    MODULE_FORMAT,
    MODULE_NAME,
    WEIGHTS_NAME,
    PackedTensor,
    dtype_name,
    write_sparse,
)
from secateurs.loading import is_module_folder, is_sparse_folder, load_masks, read_sparse
from secateurs.models import PRUNABLE, load_model, weight_view
from secateurs.oneshot.moe import expert_linears, fused_parameters
from secateurs.packing import collect
from secateurs.runtime.linear import SparseLinear

log = logging.getLogger(__name__)

__all__ = [
    "AtomicFolder",
    "REPORT_NAME",
    "add_parser",
    "check_output",
    "compress",
    "is_module_folder",
    "is_sparse_folder",
    "load_masks",
    "load_pruned",
    "read_sparse",
    "save_pruned",
    "save_sparse",
]


# ------------------------------------------------------------------------------------------------------ masks
def _check_masks(model: nn.Module, masks) -> None:
    """Refuse masks that do not name a linear of ``model`` with its [out, in] shape (before anything is written).
    The experts of a fused MoE module are linears here, as the walk names them (``...experts.5.gate_proj``)."""
    if not isinstance(masks, Mapping):
        raise SecateursError(f"masks must be a dict of linear name -> bool tensor, not {type(masks).__name__}")
    modules = {**dict(model.named_modules()), **expert_linears(model)}
    for name, mask in masks.items():
        module = modules.get(name)
        if isinstance(module, SparseLinear):
            shape = (module.out_features, module.in_features)
        elif isinstance(module, PRUNABLE):
            shape = tuple(weight_view(module).shape)
        else:
            raise SecateursError(f"mask {name!r} does not name a linear of this model")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise SecateursError(f"mask {name!r} must be a 2-D bool tensor [out, in] (True = pruned), got {got}")
        if tuple(mask.shape) != shape:
            raise SecateursError(f"mask {name!r} is {list(mask.shape)}, the linear's weight is [out, in] {list(shape)}")


def _write_extras(tmp: Path, tokenizer, report: dict | None, masks) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if report is not None:
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    if masks is not None:
        save_masks(tmp / MASKS_NAME, masks)


# --------------------------------------------------------------------------------------------- Hugging Face
def save_pruned(
    model,
    tokenizer,
    folder: str | Path,
    report: dict | None = None,
    overwrite: bool = False,
    save_format: str = "hf",
    masks: Mapping[str, torch.Tensor] | None = None,
    int8_codes: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    progress: bool = True,
) -> Path:
    """Save model (safetensors), tokenizer, report and ``masks`` ({linear: bool [out, in], True = pruned}) into
    ``folder`` atomically (``progress``: a bar while packing a sparse one). ``save_format="sparse"`` writes the
    compact sparse checkpoint (:func:`save_sparse`), ``"sparse-int8"`` the same with int8 values and per-row
    scales (``int8_codes``: see :func:`save_sparse`)."""
    if save_format in ("sparse", "sparse-int8"):
        values = "int8" if save_format == "sparse-int8" else None
        save_sparse(
            model,
            tokenizer,
            folder,
            report,
            overwrite=overwrite,
            masks=masks,
            values=values,
            int8_codes=int8_codes,
            progress=progress,
        )
        return Path(folder)
    if save_format != "hf":
        raise SecateursError(f"unknown save format {save_format!r}: use hf, sparse or sparse-int8")
    if masks is not None:
        _check_masks(model, masks)
    try:
        with AtomicFolder(folder, overwrite) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            _write_extras(tmp, tokenizer, report, masks)
    except OSError as exc:
        raise SecateursError(f"cannot save to {folder}: {exc.strerror or exc}") from None
    return Path(folder)


# ------------------------------------------------------------------------------------------------------ sparse
def module_weights(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear (and Conv1D) and Conv1d/2d/3d of any module, by name: what a plain module's checkpoint packs."""
    return {
        name: m
        for name, m in model.named_modules()
        if name and isinstance(m, (*PRUNABLE, nn.modules.conv._ConvNd)) and getattr(m, "weight", None) is not None
    }


def _collect(
    model: nn.Module,
    min_sparsity: float | None,
    progress: bool,
    linears: dict | None = None,
    values: str | None = None,
    codes: Mapping | None = None,
):
    """:func:`secateurs.packing.collect`, with the linears a model already runs sparse (converted by
    to_sparse_linears / load_sparse) written as they are packed."""
    model_itemsize = next((t.element_size() for t in model.parameters() if t.is_floating_point()), 4)
    already = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            p = module.packed
            packed = PackedTensor(p.mask, p.values[: p.nnz].clone(), p.shape, module.transposed, None, p.scales)
            already[name] = (packed, model_itemsize if p.scales is not None else p.values.element_size())
    return collect(model, min_sparsity, progress, linears, values, already, codes)


def _check_values(values: str | None) -> None:
    if values not in (None, "int8"):
        raise SecateursError(f"unknown values {values!r}: int8, or None (leave it out) to keep the model's dtype")


def _is_causal_lm(model: nn.Module) -> bool:
    """A transformers model (it has a config to save); anything else is saved as a plain module."""
    return hasattr(getattr(model, "config", None), "save_pretrained")


def save_sparse(
    model: nn.Module,
    tokenizer=None,
    out_dir: str | Path | None = None,
    report: dict | None = None,
    *,
    overwrite: bool = False,
    min_sparsity: float | None = None,
    progress: bool = True,
    masks: Mapping[str, torch.Tensor] | None = None,
    values: str | None = None,
    int8_codes: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict:
    """Write ``model`` as a compact sparse folder (atomically) and return what it saved, in bytes.

    ``save_sparse(model, tokenizer, DIR)`` for a transformers causal LM: every decoder linear whose packed form is
    smaller than its dense one is packed (``min_sparsity``: only those at least this sparse); everything else,
    embeddings and LM head included, is stored dense; tied tensors once.
    ``save_sparse(model, DIR)`` for any other ``nn.Module`` (one trained with :mod:`secateurs.train`): every
    Linear and Conv weight is packed the same way (a convolution as [out, in * kernel]), with ``module.json``
    naming the class and, for the models secateurs defines, how to rebuild it; :func:`secateurs.load_sparse` runs
    its sparse Linears on the CPU kernel.
    ``masks`` ({linear: bool [out, in], True = pruned}) go to ``masks.safetensors`` beside the weights.
    ``values="int8"``: the packed weights' values as int8 codes with one float32 scale per row (symmetric
    round-to-nearest; every stored weight stays non-zero, so masks and counts are unchanged); None keeps them.
    ``int8_codes`` (with ``values="int8"``): {linear name: (int8 codes [out, in], float32 scales [out])} stored for
    those linears instead of round-to-nearest ones, e.g. from :func:`secateurs.oneshot.quantize.int8_codes`
    (GPTQ rounding on calibration text).
    """
    _check_values(values)
    if int8_codes and values != "int8":
        raise SecateursError("int8 codes are stored only with values='int8'")
    if out_dir is None and isinstance(tokenizer, (str, os.PathLike)):
        tokenizer, out_dir = None, tokenizer
    if out_dir is None:
        raise SecateursError("save_sparse needs an output folder: save_sparse(model, DIR)")
    plain = not _is_causal_lm(model)
    if masks is not None:
        if plain:
            masks = _module_masks(model, masks)
        else:
            _check_masks(model, masks)
    linears = module_weights(model) if plain else None
    if plain and not linears and not any(isinstance(m, SparseLinear) for m in model.modules()):
        raise SecateursError(f"{type(model).__name__} has no Linear or Conv weight to save sparse")
    tensors, aliases, sizes, dense_linears = _collect(model, min_sparsity, progress, linears, values, int8_codes)
    packed = sum(isinstance(t, PackedTensor) for t in tensors.values())
    fused = fused_parameters(model)
    if fused:
        log.warning(
            "%d fused MoE expert tensors (%s, ...) are stored dense: the sparse format packs 2-D linear weights only, "
            "so their zeros are kept but not compacted",
            len(fused),
            fused[0],
        )
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        with AtomicFolder(out_dir, overwrite) as tmp:
            if plain:
                (tmp / MODULE_NAME).write_text(json.dumps(module_record(model), indent=2) + "\n")
            else:
                config = copy.deepcopy(model.config)
                config.architectures = [type(model).__name__]
                config.dtype = dtype_name(dtype)
                config.save_pretrained(tmp)
                generation = getattr(model, "generation_config", None)
                if generation is not None:
                    generation.save_pretrained(tmp)
            _write_extras(tmp, tokenizer, report, None)
            write_sparse(tmp / WEIGHTS_NAME, tensors, aliases, dtype)
            if masks is not None:
                save_masks(tmp / MASKS_NAME, masks)
            folder = folder_bytes(tmp)
            weights_file = (tmp / WEIGHTS_NAME).stat().st_size
    except OSError as exc:
        raise SecateursError(f"cannot save to {out_dir}: {exc.strerror or exc}") from None
    summary = {
        "output": str(Path(out_dir)),
        "format": f"{FORMAT} v{FORMAT_VERSION}",
        "dtype": dtype_name(dtype),
        "values": values or dtype_name(dtype),
        **({"int8_rounding": "gptq" if int8_codes else "nearest"} if values == "int8" else {}),
        "packed_linears": packed,
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


def module_record(model: nn.Module) -> dict:
    """``module.json`` of a plain module: its class and, when it has one, its ``architecture()`` record."""
    make = getattr(model, "architecture", None)
    architecture = make() if callable(make) else None
    return {"format": MODULE_FORMAT, "version": 1, "class": type(model).__name__, "architecture": architecture}


def _module_masks(model: nn.Module, masks) -> dict[str, torch.Tensor]:
    """Masks of a plain module's layers as [out, in * kernel] (True = pruned), checked against its weights."""
    if not isinstance(masks, Mapping):
        raise SecateursError(f"masks must be a dict of layer name -> bool tensor, not {type(masks).__name__}")
    weights = module_weights(model)
    out = {}
    for name, mask in masks.items():
        if name not in weights:
            raise SecateursError(f"mask {name!r} does not name a Linear or Conv layer of this model")
        W = weights[name].weight
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.numel() != W.numel():
            raise SecateursError(f"mask {name!r} must be a bool tensor of the weight's shape {list(W.shape)}")
        out[name] = mask.reshape(W.shape[0], -1).cpu()
    return out


def load_pruned(folder: str | Path, dtype: str | torch.dtype | None = None, *, model: nn.Module | None = None):
    """(model, tokenizer): a sparse folder back as a plain model with dense, bit-identical weights.

    A folder holding a plain module (``save_sparse(model, DIR)``) is loaded into ``model`` (an instance of its
    class), or, when the folder records a secateurs architecture, into a new one built from it (tokenizer None).
    """
    if is_module_folder(folder) and model is None:
        from secateurs.train.models import from_architecture

        model = from_architecture(loading.module_architecture(folder))
    return loading.load_pruned(folder, dtype, model=model)


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


# -------------------------------------------------------------------------------------------------- compress
def compress(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    min_sparsity: float | None = None,
    progress: bool = True,
    values: str | None = None,
    low_memory: bool | None = None,
    calibration=None,
) -> dict:
    """Rewrite a pruned Hugging Face folder (e.g. from ``secateurs prune``) as a sparse folder; returns the sizes.

    Its ``report.json`` and ``masks.safetensors`` come along. ``values="int8"`` stores the packed values as int8
    codes with per-row scales; the source may then be a sparse folder already (its weights are read back first).
    ``low_memory``: read, pack and write one decoder layer at a time into sparse shards
    (:func:`secateurs.oneshot.streaming.compress_streamed`); None chooses it when the source's weights would not fit
    in the free memory. ``calibration`` (with int8 values; a :class:`secateurs.data.calibration.Calibration` or a
    source name): the int8 codes are chosen by GPTQ rounding on that text (:mod:`secateurs.oneshot.quantize`)
    rather than by rounding to nearest; it needs the model in memory.
    """
    src = Path(src_dir).expanduser()
    if not (src / "config.json").is_file():
        raise SecateursError(f"{src} is not a Hugging Face model folder (no config.json)")
    _check_values(values)
    if is_sparse_folder(src) and values is None:
        raise SecateursError(f"{src} is already a sparse checkpoint (add --values int8 to requantise its values)")
    if Path(out_dir).expanduser().absolute() == src.absolute():
        raise SecateursError("the output folder must differ from the source")
    if calibration is not None:
        from secateurs.data import describe_source
        from secateurs.data.calibration import Calibration

        if values != "int8":
            raise SecateursError("calibration text chooses int8 codes: it needs values='int8' (--values int8)")
        if low_memory:
            raise SecateursError("GPTQ rounding (--calibration) needs the model in memory: leave out --low-memory")
        calibration = calibration if isinstance(calibration, Calibration) else Calibration(str(calibration))
        describe_source(calibration.source)
    check_output(out_dir, overwrite)
    report = None
    if (src / REPORT_NAME).is_file():
        try:
            report = json.loads((src / REPORT_NAME).read_text())
        except (OSError, ValueError) as exc:
            log.warning("not copying %s: %s", src / REPORT_NAME, exc)
    if low_memory is None:
        from secateurs.oneshot.streaming import should_stream

        low_memory = should_stream(src) and calibration is None
        if low_memory:
            log.info("%s would not fit in the free memory: compressing it layer by layer (as with --low-memory)", src)
    if low_memory:
        from secateurs.oneshot.streaming import compress_streamed

        summary = compress_streamed(
            src,
            out_dir,
            values=values,
            min_sparsity=min_sparsity,
            overwrite=overwrite,
            report=report,
            progress=progress,
        )
        _log_summary(summary)
    else:
        masks = None
        if (src / MASKS_NAME).is_file():
            try:
                masks = load_masks(src)
            except SecateursError as exc:
                log.warning("not copying %s: %s", src / MASKS_NAME, exc)
        if is_sparse_folder(src):
            model, tokenizer = load_pruned(src)
        else:
            model, tokenizer, _ = load_model(str(src))
        codes = None
        if calibration is not None:
            from secateurs.oneshot.quantize import int8_codes

            codes = int8_codes(model, calibration.windows(tokenizer), progress=progress)
        summary = save_sparse(
            model,
            tokenizer,
            out_dir,
            report,
            overwrite=overwrite,
            min_sparsity=min_sparsity,
            progress=progress,
            masks=masks,
            values=values,
            int8_codes=codes,
        )
        if calibration is not None:
            summary["int8_calibration"] = calibration.to_dict()
    summary["source"] = str(src)
    summary["source_folder_bytes"] = folder_bytes(src)
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
    p.add_argument("source", help="a pruned Hugging Face model folder (or a sparse one, with --values int8)")
    p.add_argument(
        "--values",
        choices=["int8"],
        default=None,
        help="store the packed values as int8 with one float32 scale per row (symmetric, rounded to nearest or, "
        "with --calibration, by GPTQ; every stored weight stays non-zero); default: the model's dtype",
    )
    p.add_argument(
        "--calibration",
        default=None,
        metavar="SOURCE",
        help="with --values int8: choose the codes by GPTQ rounding against each linear's inputs on this text "
        "(bundled name, .txt/.jsonl path, c4, wikitext2) instead of rounding to nearest (lower error, needs the model "
        "in memory and one pass over the text)",
    )
    p.add_argument("--nsamples", type=int, default=32, help="--calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="--calibration tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="--calibration window seed (default 0)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="where to write the sparse folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument(
        "--min-sparsity",
        type=float,
        default=None,
        metavar="S",
        help="pack only linears at least this sparse (default: every linear whose packed form is smaller)",
    )
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="read, pack and write one decoder layer at a time (sparse shards model-0000i-of-0000n.sparse.safetensors "
        "+ model.sparse.safetensors.index.json; chosen by itself when the source would not fit in the free memory)",
    )
    p.add_argument("--json", action="store_true", help="print the sizes as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.set_defaults(run=_run)


def _run(args) -> dict:
    from secateurs.data.calibration import Calibration

    if args.min_sparsity is not None and not 0 <= args.min_sparsity <= 1:
        raise SecateursError(f"--min-sparsity must be in [0, 1], got {args.min_sparsity}")
    return compress(
        args.source,
        args.output,
        overwrite=args.overwrite,
        min_sparsity=args.min_sparsity,
        progress=not args.quiet,
        values=args.values,
        low_memory=True if args.low_memory else None,
        calibration=None
        if args.calibration is None
        else Calibration(args.calibration, args.nsamples, args.seqlen, args.seed),
    )
