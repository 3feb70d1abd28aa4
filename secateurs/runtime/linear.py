"""Sparse linears for inference: the pruned weights stay packed in memory and the kernel multiplies with them.

``to_sparse_linears(model)`` swaps the decoder linears of a loaded pruned model for :class:`SparseLinear` in place;
``load_sparse(folder)`` builds the model straight from a sparse checkpoint (never holding the dense weights) or
from a pruned Hugging Face folder. Either way ``model.generate`` works as usual.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from secateurs import loading
from secateurs.errors import SecateursError
from secateurs.format.bits import pack_mask, quantize_rows, stored_count
from secateurs.format.sparse import PACKABLE_DTYPES
from secateurs.models import decoder_linears, load_model, weight_view
from secateurs.runtime import kernels
from secateurs.runtime.modules import SparseLinear, replace_module

log = logging.getLogger(__name__)

# Below this sparsity a linear stays dense at run time: the bitmask kernel reads fewer bytes than a dense
# matmul only when enough weights are gone, and dense BLAS is hard to beat at low sparsity.
DEFAULT_MIN_SPARSITY = 0.3


class Int8Embedding(nn.Module):
    """An embedding table held as int8 codes with one float32 scale per row: a lookup dequantises only the rows
    it needs (``scale[id] * codes[id]``, in ``dtype``). Its codes may be the very memory of an int8 LM head's
    packed values (a tied table is then held once, at one byte a weight)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        if codes.dtype != torch.int8 or codes.dim() != 2 or tuple(scales.shape) != (codes.shape[0],):
            raise ValueError("codes must be int8 [num, dim] and scales float32 [num]")
        self.num_embeddings, self.embedding_dim = codes.shape
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.codes[ids].to(torch.float32) * self.scales[ids].unsqueeze(-1)).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows, dtype={str(self.dtype).removeprefix('torch.')}"


HEADS = ("kernel", "int8")


def kernel_head(model: nn.Module, values: str | None = None) -> dict:
    """Run the LM head on the sparse kernel's own threads, in place; returns what it did (bytes before and after).

    ``values=None`` keeps the head's weights as they are (float32 or bfloat16): every weight is stored, so the
    kernel takes its dense path (no mask read, no expand). Decoding with torch on one thread (as
    :func:`torch_threads` advises, so its idle workers leave the cores to the kernel) would otherwise run the
    head, the largest matrix of a small model, on one core. ``values="int8"``: int8 codes with per-row scales,
    one byte a weight. A plain ``nn.Embedding`` tied to the head then reads the very same memory (the float
    values themselves, or an :class:`Int8Embedding` over the codes), so the table is held once.

    The head's weight must be on the CPU in float32 or bfloat16. An embedding of another class (one that scales
    its output, as Gemma's does) keeps its own weight.
    """
    if values not in (None, "int8"):
        raise SecateursError(f"head values must be int8 or None (as they are), not {values!r}")
    head = model.get_output_embeddings()
    if isinstance(head, SparseLinear):
        raise SecateursError("the LM head is already on the sparse kernel")
    if not isinstance(head, nn.Linear):
        raise SecateursError(f"the model's LM head is a {type(head).__name__}, not a Linear: not for the kernel")
    W = head.weight.detach()
    if W.device.type != "cpu" or W.dtype not in kernels.DTYPES:
        raise SecateursError(f"the kernel takes a float32 or bfloat16 head on the CPU, not {W.dtype} on {W.device}")
    embedding = model.get_input_embeddings()
    tied = embedding is not None and embedding.weight.data_ptr() == W.data_ptr()
    before = W.numel() * W.element_size()
    # every weight stored, zeros too (an embedding's padding row): the kernel's dense path, and a table to share
    if values == "int8":
        stored = torch.ones(W.shape, dtype=torch.bool)
        q, scales = quantize_rows(W, stored)
        packed = kernels.from_parts(pack_mask(stored), q.reshape(-1), tuple(W.shape), scales)
    else:
        packed = kernels.pack_full(W)  # the weight's own memory when it can be
    sparse = SparseLinear(packed, head.bias)
    model.set_output_embeddings(sparse)
    out = {"head_bytes_before": before, "head_bytes_after": sparse.nbytes, "embedding": "separate"}
    if tied and type(embedding) is nn.Embedding:  # the packed values are the table, row by row
        table = packed.values[: packed.nnz].view(W.shape)
        if values == "int8":
            model.set_input_embeddings(Int8Embedding(table, packed.scales, W.dtype, embedding.padding_idx))
            out["embedding"] = "int8, shared with the head"
        else:
            embedding.weight = nn.Parameter(table, requires_grad=False)
            out["embedding"] = "shared with the head"
    elif tied:
        out["embedding"] = f"kept ({type(embedding).__name__})"
    log.info(
        "LM head on the kernel (%s): %.1f MB -> %.1f MB; embedding %s",
        values or str(W.dtype).removeprefix("torch."),
        before / 1e6,
        sparse.nbytes / 1e6,
        out["embedding"],
    )
    return out


def int8_head(model: nn.Module) -> dict:
    """:func:`kernel_head` with int8 values: the LM head as int8 codes with per-row scales on the sparse kernel
    (one byte a weight plus a bit of mask); a plain tied embedding becomes an :class:`Int8Embedding` over the
    same codes."""
    return kernel_head(model, "int8")


def use_int8_activations(model: nn.Module, enable: bool = True) -> dict:
    """Quantise the inputs of the model's int8-valued sparse linears to int8 (one scale per group of 64 inputs), in
    place, so the kernel multiplies int8 by int8 with integer dot products (AVX-512 VNNI; without it the same
    quantised inputs go through the float kernel): see :func:`secateurs.runtime.kernels.spmm`'s ``int8_inputs``.
    An int8 LM head (:func:`kernel_head` ``values="int8"``) is included. Linears with float values, or in the column
    layout (activation sparsity), are left as they are. ``enable=False`` switches it off again. Returns how many
    linears take int8 inputs and how many int8 ones were left."""
    taken = left = 0
    for m in model.modules():
        if not isinstance(m, SparseLinear) or m.packed.values.dtype != torch.int8:
            continue
        if m.packed.layout != "rows":
            left += 1
            continue
        m.int8_inputs = bool(enable)
        taken += 1
    if enable and not taken:
        raise SecateursError("int8 activations need int8 values on the kernel (compress --values int8, head int8)")
    if enable:
        how = "VNNI dot products" if kernels.vnni_available() else "the float kernel (no AVX-512 VNNI here)"
        rest = f"; {left} in the column layout left as they are" if left else ""
        log.info("int8 activations: %d linears, by %s%s", taken, how, rest)
    return {"linears": taken, "left": left, "vnni": kernels.vnni_available()}


def _threshold(min_sparsity: float | None) -> float:
    value = DEFAULT_MIN_SPARSITY if min_sparsity is None else float(min_sparsity)
    if not 0 <= value <= 1:
        raise SecateursError(f"min_sparsity must be in [0, 1], got {value}")
    return value


def to_sparse_linears(
    model: nn.Module, min_sparsity: float | None = None, threads: int | None = None, progress: bool = False
) -> dict:
    """Replace, in place, every decoder linear at least ``min_sparsity`` sparse by a :class:`SparseLinear`.

    The model is already pruned; this changes how its linears are held and multiplied, not their values.
    Returns a summary: how many linears were converted or left dense, and the bytes of their weights before and
    after. The model must be on the CPU in float32 or bfloat16 (linears in other dtypes stay dense).
    """
    from tqdm.auto import tqdm

    threshold = _threshold(min_sparsity)
    if threads is not None:
        kernels.set_num_threads(threads)
    summary = {"converted": 0, "dense": [], "dense_bytes": 0, "sparse_bytes": 0}
    for name, module in tqdm(decoder_linears(model).items(), desc="sparse linears", disable=not progress, leave=False):
        W = weight_view(module)
        sparsity = 1 - stored_count(W) / max(W.numel(), 1)
        packable = str(W.dtype).removeprefix("torch.") in PACKABLE_DTYPES and W.device.type == "cpu"
        if not packable or sparsity < threshold:
            summary["dense"].append(name)
            continue
        sparse = SparseLinear.from_dense(module)
        summary["converted"] += 1
        summary["dense_bytes"] += W.numel() * W.element_size()
        summary["sparse_bytes"] += sparse.nbytes
        replace_module(model, name, sparse)
    log.info(
        "sparse linears: %d (%.1f MB -> %.1f MB of weights), %d left dense",
        summary["converted"],
        summary["dense_bytes"] / 1e6,
        summary["sparse_bytes"] / 1e6,
        len(summary["dense"]),
    )
    return summary


def sparsify(
    model: nn.Module, min_sparsity: float | None = None, threads: int | None = None, progress: bool = False
) -> dict:
    """Deprecated name of :func:`to_sparse_linears` (it never made a model sparse, only its linears packed)."""
    warnings.warn("sparsify is deprecated: use to_sparse_linears", DeprecationWarning, stacklevel=2)
    return to_sparse_linears(model, min_sparsity, threads, progress)


def _load_module(folder, model, dtype, threshold):
    """A plain module's sparse folder (``save_sparse(model, DIR)``): Linears on the kernel, convolutions dense."""
    if model is None:
        from secateurs.train.models import from_architecture

        model = from_architecture(loading.module_architecture(folder))
    model, packed = loading.read_module_sparse(folder, model, dtype)
    converted = 0
    for name, p in packed.items():
        module = model.get_submodule(name)
        linear = isinstance(module, nn.Linear) and p.view is None
        if not linear or 1 - p.nnz / max(p.shape[0] * p.shape[1], 1) < threshold:
            loading.set_tensor(model, f"{name}.weight", nn.Parameter(loading.held(model, name, p), requires_grad=False))
            continue
        try:
            weight = kernels.from_parts(p.mask, p.values, p.shape, p.scales)
        except ValueError as exc:
            raise SecateursError(f"{folder}: cannot run {name} on the sparse kernel: {exc}") from None
        replace_module(model, name, SparseLinear(weight, module.bias, False))
        converted += 1
    log.info("loaded %s: %d sparse linears, %d packed weights unpacked", folder, converted, len(packed) - converted)
    return loading.check_loaded(model)


def load_sparse(
    folder: str | Path,
    threads: int | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    min_sparsity: float | None = None,
    model: nn.Module | None = None,
    head: str | None = None,
    activation_sparsity=None,
    calibration=None,
    fuse: bool = True,
    int8_activations: bool = False,
):
    """(model, tokenizer) ready for ``model.generate``, with the sparse linears running on the sparse kernel.

    ``folder`` is a sparse checkpoint (``secateurs compress`` / ``prune --save-format sparse``: the dense weights
    of packed linears are never allocated) or a pruned Hugging Face folder (loaded, then :func:`to_sparse_linears`).
    Packed linears less than ``min_sparsity`` sparse are unpacked to dense ones. ``threads``: the kernel's threads
    (default: torch's). ``dtype`` converts the model (e.g. bfloat16) instead of keeping the stored dtype.

    A plain module's folder (``save_sparse(model, DIR)`` of a sparse-trained model) gives (model, None): the model
    is ``model`` (an instance of the saved class) or, for the models secateurs defines, one rebuilt from the
    folder's architecture record; its sparse Linears run on the kernel, convolutions are unpacked to dense.
    ``head="kernel"``: the LM head runs on the kernel's threads as it is; ``head="int8"``: held as int8 there too
    (and a plain embedding tied to it), see :func:`kernel_head`.
    ``activation_sparsity``: skip that fraction of each linear's inputs at decode (a number, or a dict of glob
    pattern to number), thresholds calibrated on ``calibration`` (a :class:`~secateurs.data.calibration.Calibration`;
    default a few windows of bundled text): see :func:`secateurs.runtime.activation.sparsify_activations`.
    ``fuse``: the linears that share an input (q/k/v, gate/up) run as one kernel call each group, their weights
    held once (:func:`secateurs.runtime.fused.fuse_shared_inputs`; outputs unchanged). Change the model's dtype
    before grouping (``dtype=`` here does), not after: a group holds its members' biases as they were.
    ``int8_activations``: the inputs of int8-valued linears (and an int8 head) are quantised to int8 per group of
    64 and multiplied by integer dot products (:func:`use_int8_activations`).
    """
    if head not in (None, *HEADS):
        raise SecateursError(f"head must be one of {', '.join(HEADS)} or None, not {head!r}")
    threshold = _threshold(min_sparsity)
    if head and loading.is_module_folder(folder):
        raise SecateursError(f"{folder} holds a plain module, not a language model: it has no LM head for the kernel")
    if activation_sparsity is not None:
        from secateurs.runtime.activation import check_sparsity

        check_sparsity(activation_sparsity)  # before any loading
        if loading.is_module_folder(folder):
            raise SecateursError("activation sparsity needs a language model folder (with a tokenizer)")
    model, tokenizer = _load_lm(folder, dtype, threshold, threads, model, head)
    if activation_sparsity is not None:
        from secateurs.runtime.activation import sparsify_activations

        sparsify_activations(model, activation_sparsity, tokenizer, calibration=calibration, kernel=True)
    if int8_activations:
        use_int8_activations(model)
    if fuse and tokenizer is not None:
        from secateurs.runtime.fused import fuse_shared_inputs

        fuse_shared_inputs(model)
    return model, tokenizer


def _load_lm(folder, dtype, threshold, threads, model, head):
    """:func:`load_sparse` without activation sparsity."""
    if threads is not None:
        kernels.set_num_threads(threads)
    if loading.is_module_folder(folder):
        return _load_module(folder, model, dtype, threshold), None
    if not loading.is_sparse_folder(folder):
        model, tokenizer, _ = load_model(str(folder), dtype or "auto")
        to_sparse_linears(model, threshold)
        if head:
            kernel_head(model, "int8" if head == "int8" else None)
        return model, tokenizer
    model, packed, tokenizer = loading.read_sparse(folder, dtype)
    converted = 0
    for name, p in packed.items():
        module = model.get_submodule(name)
        if 1 - p.nnz / max(p.shape[0] * p.shape[1], 1) < threshold:
            module.weight = nn.Parameter(loading.held(model, name, p))
            continue
        try:
            weight = kernels.from_parts(p.mask, p.values, p.shape, p.scales)
        except ValueError as exc:
            raise SecateursError(f"{folder}: cannot run {name} on the sparse kernel: {exc}") from None
        replace_module(model, name, SparseLinear(weight, getattr(module, "bias", None), p.transposed))
        converted += 1
    log.info("loaded %s: %d sparse linears, %d packed ones unpacked", folder, converted, len(packed) - converted)
    model = loading.check_loaded(model)
    if head:
        kernel_head(model, "int8" if head == "int8" else None)
    return model, tokenizer


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``, then restore the previous count.

    For decoding on the sparse kernel, ``with torch_threads(1): model.generate(...)`` lets the kernel's threads
    have the cores: PyTorch's idle OpenMP workers otherwise spin between ops on the cores the kernel needs
    (SmolLM2-135M at 70%, 2 cores: 1.64x dense instead of 1.08x).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
