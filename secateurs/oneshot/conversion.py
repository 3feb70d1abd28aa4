"""A checkpoint's tensors under the model's own names, by transformers' own conversion mapping, and back again.

transformers 5 renames and fuses some checkpoints' tensors on loading: the experts of an MoE block, stored expert
by expert (``mlp.experts.3.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.3.w1.weight``), become 3-D
parameters (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj``) through the model's
``WeightConverter`` operations (``MergeModulelist``, ``Concatenate``), and ``save_pretrained`` reverses them. A
streamed model reads one decoder layer at a time, so the same mapping is applied to that layer's tensors alone:

* :func:`converted` wraps a folder's :class:`~secateurs.oneshot.streaming.Shards` so that it offers the model's
  tensor names: every checkpoint name is renamed as ``from_pretrained`` renames it (the model's
  ``get_model_conversion_mapping``, ``rename_source_key``, in transformers' key order, so the experts are stacked
  in their order), and a tensor a converter builds is read as its source tensors, then converted by a copy of that
  very converter. Each converter's output is first computed on meta tensors of the sources' shapes (read from the
  shard headers), so a checkpoint that does not convert to the model's shapes is refused before any work. While a
  layer's experts are fused, its source tensors and the fused ones are both held (twice the experts of one layer).
* the transforms that matched are kept on the model (``_weight_conversions``), as ``from_pretrained`` keeps them,
  and :func:`checkpoint_tensors` names a layer's tensors as ``save_pretrained`` writes them
  (``revert_weight_conversion``, e.g. the fused experts split back into per-expert tensors): the streamed output
  holds the tensors, names and layout the in-memory prune's ``save_pretrained`` writes.

With a transformers that has no conversion mapping (4.x keeps experts as separate linears) nothing is renamed.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import nn

from secateurs.errors import SecateursError


def _machinery():
    """transformers' loading and saving transforms (a namespace), or None where it has none (4.x)."""
    try:
        from transformers import conversion_mapping, core_model_loading
    except ImportError:
        return None
    return SimpleNamespace(
        mapping=conversion_mapping.get_model_conversion_mapping,
        converter=core_model_loading.WeightConverter,
        renaming=core_model_loading.WeightRenaming,
        natural=core_model_loading.dot_natural_key,
        rename=core_model_loading.rename_source_key,
        revert=core_model_loading.revert_weight_conversion,
    )


class Converted:
    """``shards`` (checkpoint names) seen under the model's tensor names: ``location``, ``read``, ``read_rows``,
    ``nbytes``, ``folder`` and ``packed`` as :class:`~secateurs.oneshot.streaming.Shards` offers them."""

    def __init__(self, shards, model: nn.Module, direct: dict[str, str], groups: dict[str, tuple]):
        self.shards, self.model = shards, model
        self.folder, self.packed = shards.folder, shards.packed
        self.direct = direct  # model name -> checkpoint name (the same, or renamed)
        self.groups = groups  # first target -> (converter, [(source pattern, checkpoint name)], targets)
        self.built = {t: first for first, (_, _, targets) in groups.items() for t in targets}  # target -> group
        self.location = {name: shards.location[key] for name, key in direct.items()}
        for target, first in self.built.items():
            self.location.setdefault(target, shards.location[groups[first][1][0][1]])

    @property
    def nbytes(self) -> int:
        return self.shards.nbytes

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        direct = [n for n in names if n in self.direct]
        firsts = list(dict.fromkeys(self.built[n] for n in names if n not in self.direct))
        keys = [self.direct[n] for n in direct] + [k for f in firsts for _, k in self.groups[f][1]]
        tensors = self.shards.read(keys)
        out = {n: tensors.pop(self.direct[n]) for n in direct}
        for first in firsts:
            built = _convert(self.groups[first], first, tensors, self.model)
            out.update({n: t for n, t in built.items() if n in names})
        return out

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        if name in self.direct:
            return self.shards.read_rows(self.direct[name], rows)
        return self.read([name])[name][rows]


def converted(shards, model: nn.Module):
    """``shards`` under ``model``'s tensor names (``shards`` itself when every name already is the model's), the
    transforms the checkpoint needed kept on ``model`` as ``from_pretrained`` keeps them. A checkpoint whose
    converted tensors do not come out with the model's shapes is refused with the first such tensor."""
    tf = _machinery()
    if tf is None:
        return shards
    meta = model.state_dict()
    transforms = tf.mapping(model)  # what from_pretrained uses for the model
    renamings = [t for t in transforms if isinstance(t, tf.renaming)]
    converters = [t for t in transforms if isinstance(t, tf.converter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = model.base_model_prefix
    direct: dict[str, str] = {}
    sources: dict[str, tuple] = {}
    for key in sorted(shards.location, key=tf.natural):  # the order from_pretrained collects them in
        target, pattern = tf.rename(key, renamings, converters, prefix, meta)
        if target not in meta and key in meta:
            target, pattern = tf.rename(key, [], [], prefix, meta)
        if target not in meta:
            continue
        if pattern is None:
            direct.setdefault(target, key)
        else:
            sources.setdefault(target, (by_pattern[pattern], []))[1].append((pattern, key))
    if not _is_sparse(shards):  # a compact sparse folder holds the model's names and is read as load_pruned reads it
        model._weight_conversions = [t for t in transforms if t.was_used()]
    if not sources and all(name == key for name, key in direct.items()):
        return shards
    shapes = shards.shapes([k for _, group in sources.values() for _, k in group])
    groups = {}
    for first, (converter, group) in sources.items():
        dry = {k: torch.empty(shapes[k], device="meta") for _, k in group}
        where = f"{shards.folder}: {first} (from {group[0][1]} and {len(group) - 1} more)"
        try:
            built = _convert((converter, group, ()), first, dry, model)
        except Exception as exc:  # whatever transformers' operation raises, these tensors do not convert
            raise SecateursError(f"{where}: transformers' conversion fails on these tensors ({exc})") from None
        for name, tensor in built.items():
            if name not in meta or tuple(tensor.shape) != tuple(meta[name].shape):
                want = list(meta[name].shape) if name in meta else "no such tensor"
                raise SecateursError(f"{where}: converts to {name} {list(tensor.shape)}, the model has {want}")
        groups[first] = (converter, group, tuple(built))
    return Converted(shards, model, direct, groups)


def _is_sparse(shards) -> bool:
    from secateurs.format.sparse import is_sparse_folder

    return is_sparse_folder(shards.folder)


def _convert(group: tuple, first: str, tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The model tensors a converter builds from its source tensors (a copy of it, as from_pretrained makes one for
    every tensor it builds)."""
    template, sources, _ = group
    converter = copy.deepcopy(template)
    for pattern, key in sources:
        converter.add_tensor(first, key, pattern, tensors.pop(key))
    out = converter.convert(first, model=model, config=getattr(model, "config", None))
    return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}


def checkpoint_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (by the model's names) under the names and in the layout ``save_pretrained`` writes them: the
    model's conversions reversed (those the checkpoint used, or transformers' defaults for the model), contiguous."""
    tf = _machinery()
    if tf is not None:
        tensors = tf.revert(model, tensors)
    return {name: tensor.contiguous() for name, tensor in tensors.items()}
