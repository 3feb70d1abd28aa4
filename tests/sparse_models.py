"""Pruned tiny models and bit-exact comparisons, shared by the checkpoint, format and runtime tests."""

from __future__ import annotations

import torch
from conftest import tiny_model

import secateurs

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bit patterns (so -0.0 != +0.0 and NaN == NaN)."""
    return t.detach().contiguous().view(_INT[t.element_size()])


def assert_bit_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert sa[key].shape == sb[key].shape, key
        assert torch.equal(bits(sa[key]), bits(sb[key])), key


def pruned_tiny(family: str, dtype=torch.float32, sparsity: float = 0.7, **recipe):
    model = tiny_model(family).to(dtype)
    secateurs.prune(model, secateurs.Recipe(method="magnitude", sparsity=sparsity, **recipe), progress=False)
    return model


def partial_dirs(parent) -> list:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]
