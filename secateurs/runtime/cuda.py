"""2:4-pruned models on NVIDIA GPUs: PyTorch's semi-structured sparse tensors (sparse tensor cores, sm80+).

``to_semi_structured(model)`` replaces the weight of every decoder linear that is 2:4 sparse (at most 2 non-zeros
in every 4 consecutive inputs of a row) by ``torch.sparse.to_sparse_semi_structured(W)``, which ``F.linear``
multiplies with on sparse tensor cores. The model must be on a CUDA device of compute capability 8.0 or more, in
float16 or bfloat16. GPT-2 style Conv1D layers are first turned into the equivalent nn.Linear.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.models import decoder_linears, weight_view

log = logging.getLogger(__name__)

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_support(device: torch.device | str | None = None) -> str | None:
    """None when this device runs semi-structured sparse matmuls, else why not (one sentence)."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    device = torch.device(device or "cuda")
    if device.type != "cuda":
        return f"semi-structured sparsity needs a CUDA device, not {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"semi-structured sparsity needs compute capability 8.0 or more; this GPU has {major}.{minor}"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):  # pragma: no cover - old torch
        return "this PyTorch has no torch.sparse.to_sparse_semi_structured"
    return None


def is_2_4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of every row ([out, in]) holds at most 2 non-zeros."""
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight != 0).view(rows, cols // 4, 4).sum(-1) <= 2).all())


def _as_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear computing what ``module`` (Linear or Conv1D) computes, sharing nothing it does not need."""
    if isinstance(module, nn.Linear):
        return module
    W = weight_view(module)
    linear = nn.Linear(W.shape[1], W.shape[0], bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(W.contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder linears of a causal LM; for any other model (one sparse-trained with SR-STE, say), every
    ``nn.Linear``."""
    try:
        return decoder_linears(model)
    except SecateursError:
        return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def to_semi_structured(model: nn.Module) -> dict:
    """Make every 2:4 linear of ``model`` (on CUDA, fp16/bf16) semi-structured sparse, in place: the decoder
    linears of a causal LM, or every ``nn.Linear`` of any other module.

    Returns ``{"converted": n, "dense": {name: why}}``. Raises SecateursError when the device cannot, or when no
    linear is 2:4 sparse (the model was not pruned with ``--pattern 2:4`` or trained with SR-STE 2:4).
    """
    param = next(model.parameters())
    why = semi_structured_support(param.device)
    if why:
        raise SecateursError(why)
    if param.dtype not in SEMI_STRUCTURED_DTYPES:
        raise SecateursError(f"semi-structured sparsity needs float16 or bfloat16 weights, not {param.dtype}")
    converted, dense = 0, {}
    for name, module in _linears(model).items():
        linear = _as_linear(module)
        W = linear.weight.detach()
        if not is_2_4(W):
            dense[name] = "not 2:4 sparse"
            continue
        try:
            sparse = torch.sparse.to_sparse_semi_structured(W.contiguous())
        except RuntimeError as exc:  # shape not a multiple of the kernel's tile, unsupported dtype ...
            dense[name] = str(exc).splitlines()[0]
            continue
        linear.weight = nn.Parameter(sparse, requires_grad=False)
        if linear is not module:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, linear)
        converted += 1
    if not converted:
        raise SecateursError(
            "no decoder linear could be made semi-structured sparse (prune with --pattern 2:4): "
            + "; ".join(f"{k}: {v}" for k, v in list(dense.items())[:3])
        )
    log.info("semi-structured 2:4: %d linears, %d left dense", converted, len(dense))
    return {"converted": converted, "dense": dense}
