"""Run a module with other tensors in place of its own (``torch.func.functional_call``), keeping them differentiable.

This is what lets AdaMerging learn merge coefficients (the merged weights are a function of them) and DAREx pick
its rescaling on data, without copying weights into the model for every candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

# forward(model, tensors, x) -> outputs: the model run on x with ``tensors`` in place of its own (by name)
Forward = Callable[[nn.Module, Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]


def forward(model: nn.Module, tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The model's outputs on ``x`` with ``tensors`` replacing its own (the rest, integer buffers included, as the
    model holds them; a tied weight follows its first name). A transformers output gives its ``logits``."""
    kwargs = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    out = functional_call(model, dict(tensors), (x,), kwargs, tie_weights=True, strict=False)
    return getattr(out, "logits", out)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the last dimension, averaged over every other one."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()
