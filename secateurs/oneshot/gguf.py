"""A GGUF file read one tensor at a time, for streaming: dequantised on demand, under the model's own tensor names.

transformers loads a GGUF checkpoint by dequantising every tensor at once (``load_gguf_checkpoint``); a model bigger
than memory needs each decoder layer's tensors alone. :class:`GGUFShards` offers what :class:`~secateurs.oneshot.
streaming.Shards` offers for safetensors folders (``location``, ``read``, ``read_rows``, ``nbytes``), with the very
name mapping and per-tensor conversions transformers applies (``get_gguf_hf_weights_map`` and the architecture's
``TensorProcessor``, e.g. LLaMA's q/k head permutation undone), so the streamed model equals the one
``from_pretrained(gguf_file=...)`` builds. The file is mapped only while tensors are read (a mapping kept open
would keep every page read so far resident), and the rows of an embedding are dequantised without the rest. The
file is parsed once: its tensor table (name, type, offset, shape) is kept, so a read maps just the bytes it needs
rather than parsing the header (vocabulary included) again for every layer.

Architectures whose tensor processor rewrites names or fuses tensors across the file (the MoE ones, GPT-2's head)
are refused with one line: load those in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from secateurs.errors import SecateursError

# processors whose process() maps one GGUF tensor to one tensor of the same name (the others rename or fuse)
_PER_TENSOR = {"TensorProcessor", "LlamaTensorProcessor", "NemotronTensorProcessor", "Gemma2TensorProcessor"}


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise SecateursError(f"cannot read {path}: {exc} (truncated or not a GGUF file?)") from None


def gguf_config(path: Path) -> dict:
    """The transformers config fields of a GGUF file (its metadata only, no tensor read)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise SecateursError(f"cannot read the metadata of {path}: {exc}") from None


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's data lie in the file, and how GGUFReader views them (bytes for quantised types)."""

    name: str  # the GGUF name
    tensor_type: int  # GGMLQuantizationType
    offset: int  # absolute byte offset of the data
    dtype: np.dtype
    shape: tuple[int, ...]


class GGUFShards:
    """The tensors of one GGUF file by the model's tensor names, dequantised when read."""

    def __init__(self, path: str | Path, model: nn.Module):
        from gguf import MODEL_ARCH_NAMES  # noqa: F401 (gguf is there: transformers needs it for the mapping)
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )

        self.path = Path(path)
        self.folder = self.path.parent
        reader = _reader(self.path)
        architecture = read_field(reader, "general.architecture")[0]
        processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
        if processor_class.__name__ not in _PER_TENSOR:
            raise SecateursError(
                f"{self.path}: streaming a GGUF of architecture {architecture!r} is not supported (its tensors are "
                "renamed or fused on loading): prune it in memory, without --low-memory"
            )
        self.processor = processor_class(config=gguf_config(self.path))
        self.to_gguf = {hf: g for g, hf in get_gguf_hf_weights_map(model, self.processor).items()}
        self.table = {
            t.name: _Entry(t.name, int(t.tensor_type), int(t.data_offset), t.data.dtype, tuple(t.data.shape))
            for t in reader.tensors
        }
        self.location = {hf: g for hf, g in self.to_gguf.items() if g in self.table}
        self.files = [self.path.name]
        del reader

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    def _entry(self, name: str) -> _Entry:
        try:
            return self.table[self.location[name]]
        except KeyError:
            raise SecateursError(f"{self.path} has no tensor for {name}") from None

    def _data(self, entry: _Entry) -> np.ndarray:
        """The tensor's data as GGUFReader views them, mapped from the file (released with the array)."""
        try:
            return np.memmap(self.path, dtype=entry.dtype, mode="r", offset=entry.offset, shape=entry.shape)
        except (OSError, ValueError) as exc:
            raise SecateursError(
                f"cannot read {entry.name} from {self.path}: {exc} (file changed or truncated?)"
            ) from None

    def _convert(self, weights: np.ndarray, gguf_name: str) -> torch.Tensor:
        result = self.processor.process(weights=weights, name=gguf_name)
        return torch.from_numpy(np.ascontiguousarray(result.weights).copy())

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, dequantised (float32 for quantised types) and converted as transformers does."""
        from gguf import dequantize

        out = {}
        for name in names:
            entry = self._entry(name)
            data = self._data(entry)
            out[name] = self._convert(dequantize(data, entry.tensor_type), entry.name)
            del data
        return out

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` of the 2-D tensor ``name`` (an embedding), dequantising only those rows."""
        from gguf import dequantize

        entry = self._entry(name)
        data = self._data(entry)  # [rows, bytes or values per row]: quantised blocks never cross a row
        part = np.array(data[np.asarray(rows, dtype=np.int64)]) if rows else np.array(data[0:0])
        del data
        return self._convert(dequantize(part, entry.tensor_type), entry.name)
