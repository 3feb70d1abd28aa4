"""The 2:4 semi-structured checks of secateurs.runtime.cuda that run without a GPU (tests/test_gpu.py has the rest)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from secateurs.errors import SecateursError
from secateurs.runtime import cuda


def test_semi_structured_checks_without_gpu():
    W = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4]])
    assert cuda.is_2_4(W) and not cuda.is_2_4(torch.ones(1, 8)) and not cuda.is_2_4(torch.ones(1, 6))
    if not torch.cuda.is_available():
        assert cuda.semi_structured_support() == "CUDA is not available"
        with pytest.raises(SecateursError, match="CUDA"):
            cuda.to_semi_structured(tiny_model("llama"))
