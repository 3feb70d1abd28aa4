"""Models as flat {name: tensor} dicts, task vectors, and the check that two models can be merged at all.

Merging works on the floating-point tensors of a state dict (parameters and float buffers such as BatchNorm's
running statistics); integer buffers (step counters, position ids) are left as the base has them. A tensor that
shares memory with an earlier one (tied input and output embeddings) appears once, under its first name, so a
tied weight is neither counted nor merged twice; :func:`tied_names` says which names were folded.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from secateurs.errors import SecateursError

Tensors = dict[str, torch.Tensor]


def _memory(t: torch.Tensor):
    """Identity of a tensor's memory: tied tensors share it (None for empty or meta tensors)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def tied_names(model: nn.Module) -> dict[str, str]:
    """{later name: first name} for every state-dict entry that shares memory with an earlier one."""
    first: dict = {}
    tied = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = _memory(t)
        if key is not None and key in first:
            tied[name] = first[key]
        elif key is not None:
            first[key] = name
    return tied


def float_tensors(model: nn.Module | Mapping[str, torch.Tensor]) -> Tensors:
    """The floating-point tensors of a model (its state dict, tied names folded) or of a state dict, detached."""
    if isinstance(model, nn.Module):
        tied = tied_names(model)
        state = {k: v for k, v in model.state_dict().items() if k not in tied}
    else:
        state = dict(model)
    return {k: v.detach() for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def first_mismatch(base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> str | None:
    """What differs first (in the base's order) between two sets of tensors: a missing or extra tensor, or a
    shape; None when they hold the same names with the same shapes."""
    for name, t in base.items():
        if name not in other:
            return f"it has no tensor {name}"
        if tuple(other[name].shape) != tuple(t.shape):
            return f"{name} is {_shape(other[name])} there, {_shape(t)} in the base"
    extra = next((name for name in other if name not in base), None)
    return None if extra is None else f"the base has no tensor {extra}"


def check_match(base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], label: str = "model") -> None:
    """Refuse ``other`` unless it holds exactly the base's tensors with the base's shapes; the error names the
    first tensor (in the base's order) that is missing, extra or of another shape."""
    problem = first_mismatch(base, other)
    if problem is not None:
        raise SecateursError(f"{label} does not match the base: {problem}")


def task_vector(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> Tensors:
    """tau = finetuned - base for every tensor of ``base``, in float32 (the arithmetic of every merge)."""
    check_match(base, finetuned, "the fine-tuned model")
    return {name: finetuned[name].float() - t.float() for name, t in base.items()}


def add(base: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor], scale: float = 1.0) -> Tensors:
    """base + scale * vector, computed in float32 and returned in each base tensor's dtype; tensors the vector
    does not name are the base's (the same objects)."""
    out = dict(base)
    for name, v in vector.items():
        b = base[name]
        total = b.float() + (v.float() if scale == 1.0 else scale * v.float())
        out[name] = total.to(b.dtype)
    return out


def load_into(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``tensors`` into ``model`` in place (a tied name gets its first name's tensor); every tensor named must
    exist in the model with the same shape."""
    state = model.state_dict()
    for name, source in tied_names(model).items():
        if source in tensors and name not in tensors:
            tensors = {**tensors, name: tensors[source]}
    check = {k: state[k] for k in tensors if k in state}
    if len(check) != len(tensors):
        missing = next(k for k in tensors if k not in state)
        raise SecateursError(f"the model has no tensor {missing}")
    check_match(check, tensors, "the merged tensors")
    with torch.no_grad():
        for name, t in tensors.items():
            state[name].copy_(t)
    return model
