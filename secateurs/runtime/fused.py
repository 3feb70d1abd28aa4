"""One kernel call for the linears that share an input (q/k/v, gate/up).

A decoder layer of a LLaMA-like model multiplies the same normed hidden state by q, k and v, and the same one by
gate and up: five calls where two would do. :func:`fuse_shared_inputs` finds those groups by watching one short
forward pass (which linears receive the very same tensor object), holds each group's packed weights as one
(their rows one after the other: masks, values, offsets, int8 scales), and lets each member's
:class:`~secateurs.runtime.modules.SparseLinear` view its own rows of it, so the memory is held once. At run time
the first member called with an input multiplies the whole group's weight; the others, called with the same
tensor (same object, not modified in place since: under ``torch.inference_mode``, which keeps no modification
count, the same object), take their columns of that result.

Fewer calls mean less Python and thread hand-off between the kernel's calls (SmolLM2: 210 calls a token become
120) and longer streams over the weights. The result is exactly the separate calls' (the same kernel on the same
rows). Inference only, one thread of Python at a time (the one-entry cache is per group, not per thread).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from secateurs.runtime import kernels
from secateurs.runtime.modules import SparseLinear

log = logging.getLogger(__name__)


def _concat(weights: list[kernels.PackedWeight]) -> kernels.PackedWeight:
    """The packed weights of one input width, their rows one after the other (the same values and masks)."""
    cols = weights[0].shape[1]
    out = sum(p.shape[0] for p in weights)
    mask = torch.cat([p.mask for p in weights])
    values = torch.cat([p.values[: p.nnz] for p in weights])
    scales = None if weights[0].scales is None else torch.cat([p.scales for p in weights])
    return kernels.from_parts(mask, values, (out, cols), scales)


def _rows_of(fused: kernels.PackedWeight, r0: int, r1: int) -> kernels.PackedWeight:
    """Rows [r0, r1) of ``fused`` as a packed weight of their own that views its memory (values from the rows'
    first one, with the rest of the buffer as the SIMD padding; offsets rebased)."""
    start, end = int(fused.row_offsets[r0]), int(fused.row_offsets[r1])
    values = fused.values[start : end + kernels.PAD_VALUES]
    offsets = fused.row_offsets[r0 : r1 + 1] - start
    scales = None if fused.scales is None else fused.scales[r0:r1]
    return kernels.PackedWeight((r1 - r0, fused.shape[1]), fused.mask[r0:r1], values, offsets, end - start, scales)


def _version(x: torch.Tensor) -> int:
    """The tensor's in-place modification count; 0 for an inference tensor, which keeps none (the input of a
    group under ``torch.inference_mode`` is then recognised by identity alone)."""
    return 0 if x.is_inference() else x._version


class SharedInput:
    """A group of sparse linears that take the same input, multiplied as one (see the module docstring)."""

    def __init__(self, members: list[SparseLinear]):
        self.fused = _concat([m.packed for m in members])
        biases = [m.bias for m in members]
        if any(b is not None for b in biases):
            dtype = next(b.dtype for b in biases if b is not None)
            parts = [torch.zeros(m.out_features, dtype=dtype) if m.bias is None else m.bias.detach() for m in members]
            self.bias = torch.cat([b.to(dtype) for b in parts])
        else:
            self.bias = None
        self.members = list(members)
        self.bounds = []
        r0 = 0
        for m in members:
            self.bounds.append((r0, r0 + m.out_features))
            r0 += m.out_features
        for index, m in enumerate(members):
            m.packed = _rows_of(self.fused, *self.bounds[index])
            m.shared = (self, index)
        self._clear()

    def _clear(self) -> None:
        self._x = self._y = None
        self._version = -1
        self._served: set[int] = set()

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        version = _version(x)
        if self._x is x and version == self._version and index not in self._served:
            y = self._y
        else:  # a new input (or this member's second call with it): the whole group's product
            y = kernels.spmm(x, self.fused, self.bias, None, self.members[0].int8_inputs)
            self._x, self._version, self._y, self._served = x, version, y, set()
        self._served.add(index)
        if len(self._served) == len(self.members):  # every member has its part: hold nothing longer
            self._clear()
        r0, r1 = self.bounds[index]
        part = y[..., r0:r1]
        return part if part.is_contiguous() else part.contiguous()

    def release(self) -> None:
        """Let every member run on its own again (their packed weights keep viewing the group's memory)."""
        for m in self.members:
            m.shared = None
        self._clear()


def _candidates(model: nn.Module) -> dict[str, SparseLinear]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, SparseLinear)
        and m is not head
        and m.packed.layout == "rows"
        and m.threshold is None
        and getattr(m, "shared", None) is None
    }


@torch.no_grad()
def _groups(model: nn.Module, candidates: dict[str, SparseLinear], probe: torch.Tensor) -> list[list[str]]:
    """The candidates that received the very same input tensor during one forward pass over ``probe``, by group
    (each group of at least two, of one input width, values dtype and bias presence; in model order)."""
    seen: dict[int, list[str]] = {}
    held = []  # every input stays alive during the pass, so no address or id is reused meanwhile

    def hook(name):
        def record(module, args):
            held.append(args[0])
            seen.setdefault(id(args[0]), []).append(name)

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in candidates.items()]
    try:
        model(input_ids=probe, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    groups = []
    for names in seen.values():
        names = list(dict.fromkeys(names))  # a linear called twice with one input counts once
        by_kind: dict[tuple, list[str]] = {}
        for name in names:
            p = candidates[name].packed
            m = candidates[name]
            kind = (p.shape[1], p.values.dtype, p.scales is None, m.bias is None, m.int8_inputs)
            by_kind.setdefault(kind, []).append(name)
        groups.extend(group for group in by_kind.values() if len(group) > 1)
    return groups


def fuse_shared_inputs(model: nn.Module, probe: torch.Tensor | None = None) -> dict:
    """Group the model's sparse linears that share an input (found by one forward pass over ``probe``, default two
    token ids) and multiply each group in one kernel call, in place; returns a summary (groups, calls saved).

    Only linears on the kernel in the row layout without an activation threshold are grouped (the LM head never).
    The model's outputs are unchanged. A model whose linears are grouped may still be saved, evaluated, or have
    its activations thresholded (which lets the thresholded linears run on their own again).
    """
    candidates = _candidates(model)
    if len(candidates) < 2:
        return {"groups": 0, "linears": 0, "calls_saved": 0}
    if probe is None:
        probe = torch.tensor([[1, 2]], dtype=torch.long)
    groups = _groups(model, candidates, probe)
    for names in groups:
        SharedInput([candidates[name] for name in names])
    fused = sum(len(g) for g in groups)
    summary = {"groups": len(groups), "linears": fused, "calls_saved": fused - len(groups)}
    log.info("shared inputs: %d linears in %d groups, one kernel call each", fused, len(groups))
    return summary


def release_shared_inputs(model: nn.Module) -> None:
    """Undo :func:`fuse_shared_inputs`' grouping (each linear runs on its own again; memory stays shared)."""
    for m in model.modules():
        shared = getattr(m, "shared", None)
        if shared is not None:
            shared[0].release()
