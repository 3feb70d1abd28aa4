"""Read back what secateurs saved: a compact sparse folder into a model, and the pruning masks of an output.

Model loading (:mod:`secateurs.models`) and the sparse runtime build on this module, so it imports neither; its
public functions are re-exported by :mod:`secateurs.checkpoint`. A sparse folder looks like a Hugging Face one
(``config.json``, generation config, tokenizer files, ``report.json``) but keeps its weights in
``model.sparse.safetensors``, or in sparse shards and their index (see :mod:`secateurs.format.sparse`), names plain
``from_pretrained`` does not read, so it refuses the folder instead of building a model with random weights;
:func:`load_pruned` gives the plain model back.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from secateurs.dtypes import resolve_dtype
from secateurs.errors import SecateursError
from secateurs.format import masks as mask_files
from secateurs.format.sparse import (
    MODULE_FORMAT,
    MODULE_NAME,
    PACKABLE_DTYPES,
    WEIGHTS_NAME,
    PackedTensor,
    is_sparse_folder,
    open_folder,
    read_folder,
)

log = logging.getLogger(__name__)

__all__ = [
    "check_loaded",
    "empty_model",
    "is_module_folder",
    "is_sparse_folder",
    "load_masks",
    "load_pruned",
    "module_architecture",
    "read_module_sparse",
    "read_sparse",
]


def empty_model(folder: Path, dtype: torch.dtype):
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


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name`` (a parameter stays a parameter)."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._parameters:
        module._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
    else:
        module._buffers[attr] = value


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has none."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _load_generation_config(model, folder: Path) -> None:
    if not (folder / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s/generation_config.json: %s", folder, exc)


def is_module_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a plain PyTorch module saved sparse (``module.json``, no config.json)."""
    return (Path(folder).expanduser() / MODULE_NAME).is_file()


def _module_record(folder: Path) -> dict:
    import json

    path = folder / MODULE_NAME
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SecateursError(f"cannot read {path}: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != MODULE_FORMAT:
        raise SecateursError(f"{path} is not a {MODULE_FORMAT} record")
    return record


def module_architecture(folder: str | Path) -> dict:
    """The architecture record of a plain module's folder; an error when the folder does not name one."""
    folder = Path(folder).expanduser()
    record = _module_record(folder)
    if not isinstance(record.get("architecture"), dict):
        raise SecateursError(
            f"{folder} holds a {record.get('class', 'module')} without an architecture record: pass model= "
            "(an instance of its class) to load it"
        )
    return record["architecture"]


def _packed_as(packed: dict[str, PackedTensor], dtype: torch.dtype) -> dict[str, PackedTensor]:
    """The packed weights with float values in ``dtype``; int8 codes stay codes (their scales dequantise them)."""
    return {
        key: p
        if p.scales is not None or p.values.dtype == dtype
        else PackedTensor(p.mask, p.values.to(dtype), p.shape, p.transposed, p.view)
        for key, p in packed.items()
    }


def read_module_sparse(folder: str | Path, model: nn.Module, dtype: str | torch.dtype | None = None):
    """(model, packed): a plain module's sparse folder read into ``model`` (an instance of the saved class):
    every dense tensor loaded, the packed weights returned as ``{module name: PackedTensor}`` for the caller."""
    folder = Path(folder).expanduser()
    record = _module_record(folder)
    if record.get("class") != type(model).__name__:
        log.warning("%s was saved from a %s, loading it into a %s", folder, record.get("class"), type(model).__name__)
    if not is_sparse_folder(folder):
        raise SecateursError(f"{folder} has {MODULE_NAME} but no {WEIGHTS_NAME}")
    weights = open_folder(folder)
    expected = model.state_dict(keep_vars=True)
    dense, packed = read_folder(weights, {key: tuple(t.shape) for key, t in expected.items()})
    dtype = resolve_dtype(dtype)
    if dtype not in (None, "auto"):
        dense = {k: t.to(dtype) if t.is_floating_point() else t for k, t in dense.items()}
        packed = _packed_as(packed, dtype)
    with torch.no_grad():
        for key, t in dense.items():
            set_tensor(model, key, t)
        for key, source in weights.aliases.items():
            set_tensor(model, key, dense[source])
    model.eval()
    return model, {key.removesuffix(".weight"): p for key, p in packed.items()}


def read_sparse(folder: str | Path, dtype: str | torch.dtype | None = None):
    """(model, packed, tokenizer): the model of a sparse folder with every non-packed tensor loaded, and its
    packed weights ``{module name: PackedTensor of W [out, in]}`` whose parameters are still on the meta device
    (the callers decide: dense back, or sparse modules).

    ``dtype`` converts floating tensors and packed values (then not bit-identical); None keeps the stored ones.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise SecateursError(f"{folder} is not a model folder (no config.json)")
    if not is_sparse_folder(folder):
        raise SecateursError(f"{folder} is not a sparse checkpoint (no {WEIGHTS_NAME}; compress it first)")
    weights = open_folder(folder)  # one file, or the shards of a streamed prune
    dtype = resolve_dtype(dtype)
    dtype = None if dtype == "auto" else dtype
    stored = PACKABLE_DTYPES.get(weights.dtype) or resolve_dtype(weights.dtype or "float32")
    model = empty_model(folder, dtype or stored)
    expected = model.state_dict(keep_vars=True)
    dense, packed = read_folder(weights, {key: tuple(t.shape) for key, t in expected.items()})
    if dtype is not None:
        for key, t in dense.items():
            if t.is_floating_point() and expected[key].is_floating_point():
                dense[key] = t.to(dtype)
        packed = _packed_as(packed, dtype)
    model.load_state_dict(dense, strict=False, assign=True)
    for key, source in weights.aliases.items():
        owner, _, attr = source.rpartition(".")
        module = model.get_submodule(owner)
        set_tensor(model, key, module._parameters.get(attr, module._buffers.get(attr)))
    model.eval()
    _load_generation_config(model, folder)
    return model, {key.removesuffix(".weight"): p for key, p in packed.items()}, load_tokenizer(folder)


def check_loaded(model: nn.Module) -> nn.Module:
    """Refuse a model that still has a tensor on the meta device (a checkpoint that did not fill it)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise SecateursError(f"the checkpoint left {name} without a value")
    return model


def held(model: nn.Module, name: str, p: PackedTensor) -> torch.Tensor:
    """The dense weight of packed ``name`` in the dtype the model holds there (int8 codes dequantised)."""
    t = p.to_held()
    want = model.get_submodule(name).weight.dtype
    return t if t.dtype == want else t.to(want)


def load_pruned(folder: str | Path, dtype: str | torch.dtype | None = None, *, model: nn.Module | None = None):
    """(model, tokenizer): a sparse folder back as a plain transformers model with dense, bit-identical weights.

    A plain module's folder (``module.json``) is read into ``model``, an instance of its class (tokenizer None).
    """
    if is_module_folder(folder):
        if model is None:
            raise SecateursError(f"{folder} holds a plain PyTorch module: pass model= (an instance of its class)")
        model, packed = read_module_sparse(folder, model, dtype)
        for name, p in packed.items():
            set_tensor(model, f"{name}.weight", nn.Parameter(held(model, name, p)))
        return model, None
    model, packed, tokenizer = read_sparse(folder, dtype)
    for name, p in packed.items():
        set_tensor(model, f"{name}.weight", nn.Parameter(held(model, name, p)))
    return check_loaded(model), tokenizer


def load_masks(folder: str | Path) -> dict[str, torch.Tensor]:
    """The pruning masks saved with a model (``masks=`` of save_pruned / save_sparse): {linear: bool, True = pruned}.

    Raises SecateursError when the folder has no ``masks.safetensors`` (it was saved without masks) or it is damaged.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SecateursError(f"{folder} is not a folder")
    path = folder / mask_files.MASKS_NAME
    if not path.is_file():
        raise SecateursError(f"{folder} has no {mask_files.MASKS_NAME} (it was saved without masks)")
    return mask_files.load_masks(path)
