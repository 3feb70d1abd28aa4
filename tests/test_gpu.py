"""The CUDA path: layers move to the GPU one at a time and come back (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

import secateurs
from secateurs.models import find_layers, find_linears, weight_view

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_cuda_walk_matches_cpu(method, family):
    windows = torch.randint(0, VOCAB, (4, 24))
    cpu_model, gpu_model = tiny_model(family), tiny_model(family)
    secateurs.prune(cpu_model, secateurs.Recipe(method=method), windows, device="cpu", progress=False)
    report = secateurs.prune(gpu_model, secateurs.Recipe(method=method), windows, device="cuda", progress=False)
    assert report.device.startswith("cuda")
    assert all(p.device.type == "cpu" for p in gpu_model.parameters()), "layers must go back where they were"
    for cpu_layer, gpu_layer in zip(find_layers(cpu_model)[1], find_layers(gpu_model)[1], strict=True):
        for (name, a), (_, b) in zip(find_linears(cpu_layer).items(), find_linears(gpu_layer).items(), strict=True):
            Wa, Wb = weight_view(a), weight_view(b)
            agree = ((Wa == 0) == (Wb == 0)).float().mean().item()
            assert agree > 0.99, (name, agree)  # float rounding may flip near-ties
            if method == "sparsegpt":
                assert torch.allclose(Wa, Wb, rtol=1e-3, atol=1e-3) or agree < 1


def test_cuda_evaluate_and_model_on_gpu():
    model = tiny_model("llama").cuda()
    windows = torch.randint(0, VOCAB, (2, 16))
    report = secateurs.prune(model, "sparsegpt", windows, device="cuda", progress=False)
    assert report.sparsity == pytest.approx(0.5)
    assert report.peak_cuda_bytes and report.peak_cuda_bytes > 0
