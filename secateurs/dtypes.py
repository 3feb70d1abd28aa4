"""Dtype names accepted on the command line and in the API (``auto``, ``float32``, ``bf16`` ...)."""

from __future__ import annotations

import torch

from secateurs.errors import SecateursError

DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    """A torch dtype for a name or dtype, or ``"auto"`` for None/``auto``; SecateursError for an unknown name."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype not in DTYPES:
        raise SecateursError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
