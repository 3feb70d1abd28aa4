"""Pruning a model bigger than memory: each decoder layer is read from the safetensors shards when the walk reaches
it and written to the output shards as soon as it is pruned.

The model is built as a skeleton without weights (accelerate's empty-weight init: parameters on the meta device),
the embeddings, final norm and LM head are read in, and the walk does the rest through a :class:`Streamed`
residence: a layer's tensors are read from their shard on entering, and on leaving (once pruned) written to the
output folder as one shard of its own, then dropped. Peak memory is one decoder layer, its statistics, the
calibration hidden states and the embeddings and head, whatever the depth. The output is a normal sharded
Hugging Face folder (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``), or with
``save_format="sparse"`` / ``"sparse-int8"`` a sharded compact sparse checkpoint (each layer's linears packed as
:func:`secateurs.checkpoint.save_sparse` packs them; see :mod:`secateurs.format.sparse`). :class:`Shards` reads
either kind of folder, so the output's perplexity is measured from it layer by layer too.

A checkpoint that transformers renames or fuses on loading (an MoE block's experts, stored expert by expert and
fused into 3-D parameters) is read through transformers' own conversion mapping, one layer's tensors at a time, and
written back under the names and layout ``save_pretrained`` writes (:mod:`secateurs.oneshot.conversion`). A model
tensor that neither its own name nor that mapping finds in the checkpoint is refused, naming it, before any work.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import psutil
import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from secateurs.dtypes import resolve_dtype
from secateurs.errors import SecateursError
from secateurs.format.folder import REPORT_NAME, AtomicFolder
from secateurs.format.masks import MASKS_NAME, save_masks
from secateurs.format.sparse import (
    FORMAT,
    FORMAT_VERSION,
    PackedTensor,
    dtype_name,
    is_sparse_folder,
    open_folder,
    packed_parts,
    read_packed,
    shard_name,
    write_index,
    write_sparse,
)
from secateurs.measure import give_back_memory
from secateurs.models import find_layers
from secateurs.oneshot.conversion import checkpoint_tensors, converted
from secateurs.packing import collect

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# stream when the weights take more than this fraction of the memory that is free
AUTO_FRACTION = 0.7


class Shards:
    """The tensors of a folder's safetensors files, by name, read on demand (every file checked when opened).

    A file is mapped only while its tensors are read: a mapping kept open would keep every page read so far
    resident, and the whole model would end up counted in the process's memory. A compact sparse folder (one file
    or shards) reads the same way: a packed weight is unpacked when read (checked as :func:`read_packed` checks
    it), a tied name is left to the model's tying as in a Hugging Face folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.packed: dict[str, dict] = {}  # packed weight -> its metadata entry (sparse folders)
        if is_sparse_folder(self.folder):
            self._open_sparse()
            return
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise SecateursError(f"cannot read {index}: {exc}") from None
        elif (self.folder / SINGLE).is_file():
            weight_map = None
        else:
            raise SecateursError(f"{self.folder} has no safetensors weights ({SINGLE} or {INDEX}) to stream")
        self.files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        self.location: dict[str, str] = {}
        for name in self.files:
            path = self.folder / name
            if not path.is_file():
                raise SecateursError(f"shard {path} named by {INDEX} is missing")
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = list(f.keys())
            except (SafetensorError, OSError) as exc:
                raise SecateursError(f"shard {path} is damaged or truncated ({exc})") from None
            for key in keys:
                self.location[key] = name
        for key, name in (weight_map or {}).items():
            if self.location.get(key) != name:
                raise SecateursError(f"{INDEX} names tensor {key} in {name}, which does not hold it")

    def _open_sparse(self) -> None:
        weights = open_folder(self.folder)  # headers and index checked
        self.files = [path.name for path, _ in weights.files]
        self.location = {}
        self._keys: dict[str, set[str]] = {}
        for path, header in weights.files:
            self._keys[path.name] = set(header.keys)
            self.packed.update(header.packed)
            parts = packed_parts(header)
            self.location.update({key: path.name for key in [*header.keys, *header.packed] if key not in parts})

    @property
    def nbytes(self) -> int:
        return sum((self.folder / name).stat().st_size for name in self.files)

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` of the 2-D tensor ``name``, stacked, reading nothing else of it."""
        file = self.location[name]
        try:
            with safe_open(str(self.folder / file), framework="pt") as f:
                part = f.get_slice(name)
                return torch.cat([part[r : r + 1] for r in rows]) if rows else part[0:0]
        except (SafetensorError, OSError) as exc:
            raise SecateursError(f"cannot read {name} from {file}: {exc}") from None

    def shapes(self, names: list[str]) -> dict[str, tuple[int, ...]]:
        """The shapes of the tensors ``names``, from the file headers (none of their data read)."""
        out, by_file = {}, {}
        for name in names:
            entry = self.packed.get(name)
            if entry is not None:  # a packed weight: the matrix its metadata describes, as read_packed gives it
                shape = entry.get("view") or (entry["shape"][::-1] if entry.get("transposed") else entry["shape"])
                out[name] = tuple(shape)
            else:
                by_file.setdefault(self.location[name], []).append(name)
        for file, keys in by_file.items():
            try:
                with safe_open(str(self.folder / file), framework="pt") as f:
                    out.update({key: tuple(f.get_slice(key).get_shape()) for key in keys})
            except (SafetensorError, OSError) as exc:
                raise SecateursError(f"cannot read {', '.join(keys[:2])} from {file}: {exc}") from None
        return out

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (copies in memory), each file opened once and closed again."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.location[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            try:
                with safe_open(str(self.folder / file), framework="pt") as f:
                    for key in keys:
                        if key in self.packed:
                            packed = read_packed(f, self.folder / file, self._keys[file], key, self.packed[key])
                            out[key] = packed.to_held()
                        else:
                            out[key] = f.get_tensor(key)
            except (SafetensorError, OSError) as exc:
                raise SecateursError(f"cannot read {', '.join(keys[:2])} from {file}: {exc}") from None
        return out


def should_stream(folder: str | Path) -> bool:
    """Whether a folder's weights would not fit comfortably in the memory that is free now."""
    try:
        size = Shards(folder).nbytes
    except SecateursError:
        return False
    free = psutil.virtual_memory().available
    return size > AUTO_FRACTION * free


def open_streamed(folder: str | Path, dtype="auto") -> tuple[nn.Module, object, Shards]:
    """(skeleton model with everything but its decoder layers loaded, tokenizer, shards) of a local HF folder, or of
    a .gguf file (its tensors dequantised one by one when read: :mod:`secateurs.oneshot.gguf`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    gguf = folder.suffix == ".gguf"
    where = {"pretrained_model_name_or_path": folder.parent, "gguf_file": folder.name} if gguf else {}
    shards = None if gguf else Shards(folder)
    config = AutoConfig.from_pretrained(**where) if gguf else AutoConfig.from_pretrained(folder)
    dtype = resolve_dtype(dtype)
    if dtype == "auto":
        dtype = (None if gguf else getattr(config, "dtype", None)) or torch.float32  # GGUF: dequantised to fp32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.tie_weights()  # the empty-weight init leaves tied parameters apart
    if gguf:
        from secateurs.oneshot.gguf import GGUFShards

        shards = GGUFShards(folder, model)
    else:  # the checkpoint's names as from_pretrained maps them (renamed, experts fused)
        shards = converted(shards, model)
    layers_name, _ = find_layers(model)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    for name in tensor_names(model):
        if name not in shards.location and name not in tied:
            sample = next(iter(shards.location), "nothing")
            raise SecateursError(
                f"{folder}: the checkpoint has no tensor {name} (it names tensors like {sample}), neither under that "
                "name nor through transformers' conversion mapping for the model: prune it in memory (without "
                "--low-memory)"
            )
    load_outside(model, shards, dtype)
    for name, tensor in model.state_dict().items():
        if not name.startswith(f"{layers_name}.") and tensor.device.type == "meta":
            raise SecateursError(f"{folder}: {name} is neither in the checkpoint nor tied to a tensor that is")
    tokenizer = AutoTokenizer.from_pretrained(**where) if gguf else AutoTokenizer.from_pretrained(folder)
    return model, tokenizer, shards


def outside_names(model: nn.Module, shards: Shards) -> list[str]:
    """The checkpoint's tensors outside the decoder layers (embeddings, final norm, an untied head)."""
    layers_name, _ = find_layers(model)
    return [n for n in tensor_names(model) if not n.startswith(f"{layers_name}.") and n in shards.location]


def load_outside(model: nn.Module, shards: Shards, dtype: torch.dtype, skip: frozenset[str] = frozenset()) -> None:
    """Read the tensors outside the decoder layers in (if they are not, and not in ``skip``), tied ones tied again."""
    state = model.state_dict(keep_vars=True)
    names = [n for n in outside_names(model, shards) if state[n].device.type == "meta" and n not in skip]
    for name, value in shards.read(names).items():
        _assign(model, name, value, dtype)
    model.tie_weights()


def drop_outside(model: nn.Module, shards: Shards) -> None:
    """Drop the tensors outside the decoder layers back to the meta device: the walk needs them only for the
    capture pass (the embeddings), so a large vocabulary does not sit in memory beside every layer."""
    for name in outside_names(model, shards):
        set_module_tensor_to_device(model, name, "meta")
    model.tie_weights()
    give_back_memory()


def tensor_names(module: nn.Module) -> list[str]:
    """The names of ``module``'s parameters and persistent buffers (a tied parameter under each of its names)."""
    return list(module.state_dict(keep_vars=True))


def _assign(model: nn.Module, name: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    if value.is_floating_point():
        value = value.to(dtype)
    set_module_tensor_to_device(model, name, "cpu", value=value)


SAVE_FORMATS = ("hf", "sparse", "sparse-int8")


class Streamed:
    """Where the walk finds and leaves decoder layers when the model is streamed: read from ``shards`` on entering,
    written (by the writing rank) into ``folder`` as one output shard per layer on leaving a pruning pass, then
    dropped back to the meta device. ``save_format``: ``hf`` (safetensors shards), ``sparse`` or ``sparse-int8``
    (sparse shards, the layer's linears packed as the in-memory secateurs.checkpoint.save_sparse packs
    them, with int8 values and per-row scales for ``sparse-int8``)."""

    def __init__(
        self,
        model: nn.Module,
        shards: Shards,
        folder: str | Path | None,
        *,
        write: bool = True,
        save_format: str = "hf",
        min_sparsity: float | None = None,
    ):
        if save_format not in SAVE_FORMATS:
            raise SecateursError(f"unknown save format {save_format!r}: use hf, sparse or sparse-int8")
        self.save_format, self.min_sparsity = save_format, min_sparsity
        self.sizes: dict[str, int] = {}  # sparse output: save_sparse's byte counts, summed over the shards
        self.packed_linears, self.dense_linears = 0, []
        self.fused_dense: list[str] = []  # fused MoE expert parameters, written dense as save_sparse writes them
        self.model, self.shards = model, shards
        self.folder = Path(folder) if folder is not None else None
        self.write = write and self.folder is not None
        self.layers_name, self.layers = find_layers(model)
        self.total = len(self.layers) + 1  # one shard per decoder layer, one for the rest
        self.dtype = next(p.dtype for p in model.parameters() if p.device.type != "meta" and p.is_floating_point())
        self.weight_map: dict[str, str] = {}
        self.written = 0
        self.outside_dropped = False

    @property
    def sparse(self) -> bool:
        return self.save_format != "hf"

    def shard_name(self, number: int) -> str:
        if self.sparse:
            return shard_name(number, self.total)
        return f"model-{number:05d}-of-{self.total:05d}.safetensors"

    def load_outside(self) -> None:
        """Everything outside the decoder layers in memory (the output's last shard, the perplexity's last step)."""
        self._lookup_rows(False)
        load_outside(self.model, self.shards, self.dtype)
        self.outside_dropped = False

    def prepare(self, layers: nn.ModuleList) -> None:
        """Before the capture pass, which runs the embeddings and the first layer once: the input embedding is not
        read whole, only the rows of the tokens looked up (see :meth:`_lookup_rows`)."""
        give_back_memory()
        embedding = self._embedding_name()
        load_outside(self.model, self.shards, self.dtype, skip=frozenset({embedding}) if embedding else frozenset())
        self._lookup_rows(embedding is not None)
        self.outside_dropped = False
        self._materialize(0)

    def enter(self, index: int, layer: nn.Module, device: torch.device) -> None:
        if not self.outside_dropped:
            self._lookup_rows(False)
            drop_outside(self.model, self.shards)
            self.outside_dropped = True
        self._materialize(index)
        layer.to(device)

    def _embedding_name(self) -> str | None:
        """The checkpoint name of the input embedding's weight, when it is a plain weight lookup in the shards."""
        module = self.model.get_input_embeddings()
        if not isinstance(module, nn.Embedding) or module.max_norm is not None:
            return None
        names = {id(m): n for n, m in self.model.named_modules()}
        name = f"{names[id(module)]}.weight"
        return name if name in self.shards.location else None

    def _lookup_rows(self, on: bool) -> None:
        """With ``on``, the input embedding reads from its shard only the rows of the tokens it is asked for (a
        forward pre-hook swaps in those rows and renumbers the tokens): a 262k-token vocabulary is not read
        whole for a capture pass that looks up a few thousand tokens. Off removes the hook."""
        module = self.model.get_input_embeddings()
        hook = getattr(self, "_rows_hook", None)
        if hook is not None:  # back to the whole (unread) weight's shape
            hook.remove()
            self._rows_hook = None
            module.weight = nn.Parameter(torch.empty(self._rows_shape, dtype=self.dtype, device="meta"), False)
        if not on:
            return
        name = self._embedding_name()
        self._rows_shape = tuple(module.weight.shape)

        def rows_only(mod, args):
            ids = args[0]
            unique, inverse = torch.unique(ids, return_inverse=True)
            rows = self.shards.read_rows(name, unique.tolist())
            mod.weight = nn.Parameter(rows.to(self.dtype).to(ids.device), requires_grad=False)
            return (inverse.reshape(ids.shape), *args[1:])

        set_module_tensor_to_device(self.model, name, "meta")
        self._rows_hook = module.register_forward_pre_hook(rows_only)

    def leave(self, index: int, layer: nn.Module, final: bool) -> None:
        prefix = f"{self.layers_name}.{index}."
        if final and self.write:
            name = self.shard_name(index + 1)
            if self.sparse:
                self._write_sparse_layer(layer, prefix, name)
            else:
                tensors = {prefix + n: t.detach().to("cpu") for n, t in layer.state_dict().items()}
                tensors = checkpoint_tensors(self.model, tensors)  # as save_pretrained names and lays them out
                save_file(tensors, str(self.folder / name), metadata={"format": "pt"})
                self.weight_map.update(dict.fromkeys(tensors, name))
                self.written += sum(t.numel() * t.element_size() for t in tensors.values())
        layer.to("meta")
        give_back_memory()

    def _write_sparse_layer(self, layer: nn.Module, prefix: str, name: str) -> None:
        """One layer as a sparse shard: its linears packed by the rules of the in-memory save (only when smaller,
        float32/bfloat16 only, shared weights whole), the rest dense, tied tensors once. The experts of a fused MoE
        module are views of its 3-D parameters while the walk runs: the parameters are written (dense), not them."""
        from secateurs.models import find_linears
        from secateurs.oneshot.moe import ExpertLinear, fused_parameters

        values = "int8" if self.save_format == "sparse-int8" else None
        linears = {n: m for n, m in find_linears(layer).items() if not isinstance(m, ExpertLinear)}
        self.fused_dense += [prefix + n for n in fused_parameters(layer)]
        tensors, aliases, sizes, dense_linears = collect(layer, self.min_sparsity, False, linears, values)
        for field, n in sizes.items():
            self.sizes[field] = self.sizes.get(field, 0) + n
        self.packed_linears += sum(isinstance(t, PackedTensor) for t in tensors.values())
        self.dense_linears += [prefix + name for name in dense_linears]
        tensors = {prefix + key: t for key, t in tensors.items()}
        aliases = {prefix + key: prefix + source for key, source in aliases.items()}
        write_sparse(self.folder / name, tensors, aliases, self.dtype)
        self.weight_map.update(dict.fromkeys([*tensors, *aliases], name))
        self.written += (self.folder / name).stat().st_size

    def _materialize(self, index: int) -> None:
        layer = self.layers[index]
        if all(t.device.type != "meta" for t in layer.state_dict().values()):
            return
        prefix = f"{self.layers_name}.{index}."
        for name, value in self.shards.read([prefix + n for n in tensor_names(layer)]).items():
            _assign(self.model, name, value, self.dtype)

    def finish(self) -> None:
        """Write the tensors outside the decoder layers and the index (once every layer is written)."""
        if not self.write:
            return
        self.load_outside()
        state = self.model.state_dict()
        seen, rest, aliases = {}, {}, {}
        for name, tensor in state.items():
            if name.startswith(f"{self.layers_name}.") or name in self.weight_map:
                continue
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key in seen:  # tied (e.g. lm_head and embeddings): written once, as save_pretrained does
                aliases[name] = seen[key]
                continue
            seen[key] = name
            rest[name] = tensor.detach().to("cpu").contiguous()
        name = self.shard_name(self.total)
        if self.sparse and self.fused_dense:
            log.warning(
                "%d fused MoE expert tensors (%s, ...) are stored dense: the sparse format packs 2-D linear weights "
                "only, so their zeros are kept but not compacted",
                len(self.fused_dense),
                self.fused_dense[0],
            )
        if self.sparse:  # dense, tied names as aliases of the tensor they share
            rest_bytes = sum(t.numel() * t.element_size() for t in rest.values())
            self.sizes["dense_weights_bytes"] = self.sizes.get("dense_weights_bytes", 0) + rest_bytes
            write_sparse(self.folder / name, rest, aliases, self.dtype)
            self.weight_map.update(dict.fromkeys([*rest, *aliases], name))
            write_index(self.folder, self.weight_map, self.dtype)
            return
        rest = checkpoint_tensors(self.model, rest)
        save_file(rest, str(self.folder / name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(rest, name))
        self.written += sum(t.numel() * t.element_size() for t in rest.values())
        index = {"metadata": {"total_size": self.written}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


class StreamedOutput:
    """``with StreamedOutput(...) as residence:`` prune with ``residence``, then :meth:`save`: the output folder is
    written into a temporary folder beside it and renamed into place only when complete (only rank 0 writes).
    ``save_format``: ``hf``, ``sparse`` or ``sparse-int8`` (see :class:`Streamed`)."""

    def __init__(
        self,
        model,
        shards: Shards,
        tokenizer,
        output: str | Path,
        *,
        overwrite=False,
        write=True,
        save_format="hf",
        min_sparsity: float | None = None,
    ):
        if save_format not in SAVE_FORMATS:
            raise SecateursError(f"unknown save format {save_format!r}: use hf, sparse or sparse-int8")
        self.model, self.shards, self.tokenizer, self.write = model, shards, tokenizer, write
        self.save_format, self.min_sparsity = save_format, min_sparsity
        self.atomic = AtomicFolder(output, overwrite) if write else None

    def __enter__(self) -> Streamed:
        tmp = self.atomic.__enter__() if self.write else None
        self.residence = Streamed(
            self.model,
            self.shards,
            tmp,
            write=self.write,
            save_format=self.save_format,
            min_sparsity=self.min_sparsity,
        )
        return self.residence

    @property
    def folder(self) -> Path | None:
        """The temporary folder being written (a complete model folder once :meth:`save` is done)."""
        return self.residence.folder

    def save(self, masks: dict | None) -> None:
        """Once every layer is pruned: the rest of the weights, the index, config, tokenizer and ``masks``."""
        if not self.write:
            return
        tmp = self.residence.folder
        self.residence.finish()
        if self.residence.sparse:  # as save_sparse writes it: the class and the dtype the weights are stored in
            config = copy.deepcopy(self.model.config)
            config.architectures = [type(self.model).__name__]
            config.dtype = dtype_name(self.residence.dtype)
            config.save_pretrained(tmp)
        else:
            self.model.config.save_pretrained(tmp)
        generation = self.shards.folder / "generation_config.json"
        if generation.is_file():
            shutil.copyfile(generation, tmp / generation.name)
        self.tokenizer.save_pretrained(tmp)
        if masks is not None:
            save_masks(tmp / MASKS_NAME, masks)

    def save_report(self, report: dict) -> None:
        if self.write:
            (self.residence.folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")

    def __exit__(self, *exc):
        return self.atomic.__exit__(*exc) if self.write else False


def compress_streamed(
    source: str | Path,
    output: str | Path,
    *,
    values: str | None = None,
    min_sparsity: float | None = None,
    overwrite: bool = False,
    report: dict | None = None,
    progress: bool = True,
) -> dict:
    """``secateurs compress`` of a folder too big to load (safetensors shards, or a sparse folder to requantise):
    each decoder layer read from its shard, packed and written as a sparse shard of its own (as a streamed prune
    writes it), then dropped; peak memory one layer. The source's ``masks.safetensors`` is copied as it is (already
    1 bit per weight). Returns :func:`~secateurs.checkpoint.save_sparse`'s byte counts."""
    from tqdm.auto import tqdm

    from secateurs.format.folder import folder_bytes

    model, tokenizer, shards = open_streamed(source)
    save_format = "sparse-int8" if values == "int8" else "sparse"
    writing = StreamedOutput(
        model, shards, tokenizer, output, overwrite=overwrite, save_format=save_format, min_sparsity=min_sparsity
    )
    with writing as residence:
        for index, layer in enumerate(tqdm(residence.layers, desc="packing", unit="layer", disable=not progress)):
            residence.enter(index, layer, torch.device("cpu"))
            residence.leave(index, layer, final=True)
        writing.save(None)
        masks = Path(source) / MASKS_NAME
        if masks.is_file():
            shutil.copyfile(masks, residence.folder / MASKS_NAME)
        if report is not None:
            writing.save_report(report)
        weights = sum(p.stat().st_size for p in residence.folder.glob("*.sparse.safetensors"))
    sizes = {"linear_dense_bytes": 0, "linear_checkpoint_bytes": 0, "packed_dense_bytes": 0, "packed_bytes": 0}
    sizes.update(residence.sizes)
    folder = folder_bytes(output)
    summary = {
        "output": str(Path(output)),
        "format": f"{FORMAT} v{FORMAT_VERSION} (sharded)",
        "dtype": dtype_name(residence.dtype),
        "values": values or dtype_name(residence.dtype),
        "packed_linears": residence.packed_linears,
        "dense_linears": residence.dense_linears,
        **sizes,
        "linear_ratio": sizes["linear_checkpoint_bytes"] / max(sizes["linear_dense_bytes"], 1),
        "packed_ratio": sizes["packed_bytes"] / max(sizes["packed_dense_bytes"], 1),
        "weights_file_bytes": weights,
        "folder_bytes": folder,
        "dense_folder_bytes": folder - weights + sizes["dense_weights_bytes"],
        "streamed": True,
    }
    summary["folder_ratio"] = summary["folder_bytes"] / max(summary["dense_folder_bytes"], 1)
    return summary


@torch.no_grad()
def streamed_perplexity(
    model: nn.Module,
    residence: Streamed,
    windows: torch.Tensor,
    *,
    bos: bool,
    device: torch.device,
    source: str = "",
    available_windows: int | None = None,
    progress: bool = True,
):
    """The perplexity protocol of :func:`secateurs.evaluate.perplexity` on a streamed model: every window goes
    through one decoder layer at a time (each read once), then through the model's own forward with the layers
    replaced by the hidden states so computed, for the final norm, the LM head and the loss. The same operations as
    a whole-model forward, window by window, so the same figure."""
    from secateurs.evaluate.perplexity import perplexity_result, window_nll
    from secateurs.oneshot.capture import OnDevice, Replay, through_layers

    layers_name, layers = find_layers(model)
    hidden, tuple_output = through_layers(model, residence, windows, device, progress, "perplexity, layer by layer")
    total = 0.0
    with OnDevice(model, layers_name, device), Replay(layers, tuple_output) as replay:
        for j, row in enumerate(windows):
            replay.output = hidden[j]
            total += window_nll(model, row, device)
            hidden[j] = None
    return perplexity_result(total, windows, bos, source, available_windows)
