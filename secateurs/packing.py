"""Which tensors of a model a compact sparse checkpoint stores, and how: the packing rules shared by the in-memory
save (:func:`secateurs.checkpoint.save_sparse`) and the streamed one (:mod:`secateurs.oneshot.streaming`), which
packs one decoder layer at a time."""

from __future__ import annotations

import logging

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.format.bits import packed_bytes, stored_count
from secateurs.format.sparse import PACKABLE_DTYPES, PackedTensor, dtype_name
from secateurs.models import decoder_linears, weight_view

log = logging.getLogger(__name__)


def tensor_key(t: torch.Tensor):
    """Identity of a tensor's memory: tied parameters share it."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def collect(
    model: nn.Module,
    min_sparsity: float | None,
    progress: bool,
    linears: dict | None = None,
    values: str | None = None,
    already: dict | None = None,
    codes: dict | None = None,
):
    """What to write for ``model``: (tensors, dense and packed by name; aliases; byte counts; linears left dense).

    ``linears``: the modules whose weights may be packed (default: the decoder linears of a causal LM);
    ``values="int8"``: their stored values as int8 codes with per-row scales; ``already``: modules already packed
    (name -> (PackedTensor, bytes per weight it took dense)), written as they are; ``codes`` (with int8 values): name
    -> (int8 codes, scales) to store for that linear instead of round-to-nearest ones
    (:func:`secateurs.oneshot.quantize.int8_codes`)."""
    from tqdm.auto import tqdm

    state = model.state_dict()
    owners: dict = {}
    for key, t in state.items():
        owners.setdefault(tensor_key(t), []).append(key)
    tensors: dict[str, torch.Tensor | PackedTensor] = {}
    sizes = dict.fromkeys(("linear_dense_bytes", "linear_checkpoint_bytes", "packed_dense_bytes", "packed_bytes"), 0)
    dense_linears = []

    def add_packed(name: str, p: PackedTensor, dense_itemsize: int) -> None:
        """``dense_itemsize``: bytes a weight took dense (int8 values are compared with what they replaced)."""
        tensors[f"{name}.weight"] = p
        itemsize = p.values.element_size()
        dense = p.shape[0] * p.shape[1] * dense_itemsize
        size = packed_bytes(*p.shape, p.nnz, itemsize) + (0 if p.scales is None else p.scales.numel() * 4)
        for field, n in (("linear_dense_bytes", dense), ("linear_checkpoint_bytes", size)):
            sizes[field] += n
        sizes["packed_dense_bytes"] += dense
        sizes["packed_bytes"] += size

    already = already or {}
    for name, (p, dense_itemsize) in already.items():
        add_packed(name, p, dense_itemsize)
    already_dense_bytes = sizes["packed_dense_bytes"]
    if linears is None:
        try:
            linears = decoder_linears(model)
        except SecateursError:
            if not already:
                raise
            linears = {}  # every decoder linear is already sparse
    for name, module in tqdm(linears.items(), desc="packing", unit="linear", disable=not progress, leave=False):
        W = module.weight.data if is_conv(module) else weight_view(module)
        dense = W.numel() * W.element_size()
        nnz = stored_count(W)
        rows = W.shape[0]
        itemsize = 1 if values == "int8" else W.element_size()
        wanted = packed_bytes(rows, W.numel() // max(rows, 1), nnz, itemsize) < dense and (
            min_sparsity is None or 1 - nnz / max(W.numel(), 1) >= min_sparsity
        )
        shared = len(owners.get(tensor_key(module.weight), [])) > 1  # tied to another tensor: keep it whole
        packable = dtype_name(W.dtype) in PACKABLE_DTYPES
        if wanted and not shared and packable:
            transposed = not isinstance(module, nn.Linear) and not is_conv(module)
            given = codes.get(name) if codes and values == "int8" else None
            packed = PackedTensor.from_weight(W.cpu(), transposed=transposed, values=values, codes=given)
            add_packed(name, packed, W.element_size())
            continue
        if wanted and not shared:
            log.warning("%s stays dense: packing needs float32 or bfloat16, not %s", name, dtype_name(W.dtype))
        sizes["linear_dense_bytes"] += dense
        sizes["linear_checkpoint_bytes"] += dense
        dense_linears.append(name)
    # everything else dense, each tensor once: a name sharing another's memory (tied embeddings) is an alias
    aliases: dict[str, str] = {}
    first: dict = {}
    dense_total = already_dense_bytes  # the model written dense, for comparison
    for key, t in state.items():
        ident = tensor_key(t)
        if ident is not None and ident in first:
            aliases[key] = first[ident]
            continue
        if ident is not None:
            first[ident] = key
        dense_total += t.numel() * t.element_size()
        if key not in tensors:
            tensors[key] = t.detach().cpu().contiguous()
    sizes["dense_weights_bytes"] = dense_total
    return tensors, aliases, sizes, dense_linears
