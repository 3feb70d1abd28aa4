"""AdaMerging: the coefficients go where the entropy falls, and the functional merge is the explicit one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.merge import AdaMerging, adamerge, add, entropy, float_tensors, forward, load_into, merged_tensors


def test_entropy_by_hand():
    assert float(entropy(torch.zeros(3, 4))) == pytest.approx(float(torch.log(torch.tensor(4.0))))
    p = torch.tensor([0.5, 0.25, 0.25])
    assert float(entropy(p.log())) == pytest.approx(float(-(p * p.log()).sum()))


def _toy():
    """A linear classifier whose base predicts uniformly (weight 0); task vector 0 sharpens the predictions (the
    entropy falls as its coefficient grows), task vector 1 is zero (no gradient)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4, bias=False)
    base = {"weight": torch.zeros(4, 3)}
    sharpen = {"weight": 2.0 * torch.eye(4, 3)}
    nothing = {"weight": torch.zeros(4, 3)}
    inputs = torch.eye(3).repeat(4, 1)
    return model, base, [sharpen, nothing], [inputs, inputs]


def test_task_wise_coefficients_move_to_lower_entropy():
    model, base, vectors, inputs = _toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = AdaMerging(granularity="task", steps=20, lr=0.01, batch_size=12)
    result = adamerge(model, base, vectors, inputs, config)
    lam = result.coefficients
    assert lam.shape == (2,)
    assert lam[0] > 0.3 + 0.1  # up: more of the sharpening vector, lower entropy
    assert lam[1] == pytest.approx(0.3)  # a zero vector gets no gradient
    assert result.history[-1] < result.history[0]
    # the model's own tensors are untouched, and its parameters still require grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    # the merged tensors are base + sum lam tau
    assert torch.allclose(result.tensors["weight"], lam[0] * vectors[0]["weight"])


def test_coefficients_stay_in_the_clamp_range():
    model, base, vectors, inputs = _toy()
    result = adamerge(model, base, vectors, inputs, AdaMerging(granularity="task", steps=30, lr=0.2, batch_size=4))
    assert 0.0 <= float(result.coefficients.min()) and float(result.coefficients.max()) <= 1.0
    assert float(result.coefficients[0]) == 1.0


def test_layer_wise_has_one_coefficient_per_tensor_and_task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    base = float_tensors(model)
    vectors = [{k: 0.5 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    inputs = [torch.randn(20, 5), torch.randn(20, 5)]
    result = adamerge(model, base, vectors, inputs, AdaMerging(steps=3, batch_size=8))
    assert result.coefficients.shape == (4, 2) and result.names == list(base)
    assert len(result.history) == 3
    assert set(result.to_dict()["coefficients"]) == set(base)


def test_functional_merge_equals_explicit_merge():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    base = float_tensors(model)
    vectors = [{k: torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    x = torch.randn(7, 5)
    for coefficients in (torch.tensor([0.2, 0.5, 0.9]), torch.rand(4, 3)):
        merged = merged_tensors(base, vectors, coefficients)
        functional = forward(model, merged, x)
        explicit = load_into(copy.deepcopy(model), merged)(x)
        assert torch.equal(functional, explicit)
        # and merged_tensors is base + sum_t lambda_t tau_t
        lam = coefficients if coefficients.dim() == 1 else coefficients[0]
        want = add(base, {"0.weight": sum(lam[t] * v["0.weight"] for t, v in enumerate(vectors))})["0.weight"]
        assert torch.allclose(merged["0.weight"], want, atol=1e-6)


def test_task_heads_stay_each_tasks_own():
    """Merging the body only: each task's own head is used with the merged body, and the gradient reaches the
    body's coefficients through it."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    body = {k: v for k, v in float_tensors(model).items() if k.startswith("0.")}
    vectors = [{k: torch.randn_like(v) for k, v in body.items()} for _ in range(2)]
    heads = [{"2.weight": torch.randn(3, 8), "2.bias": torch.zeros(3)} for _ in range(2)]
    inputs = [torch.randn(16, 4), torch.randn(16, 4)]
    result = adamerge(model, body, vectors, inputs, AdaMerging(steps=2), task_tensors=heads)
    assert set(result.tensors) == set(body)
    assert not torch.equal(result.coefficients, torch.full((2, 2), 0.3))


def test_adamerging_refuses_bad_input():
    model, base, vectors, inputs = _toy()
    with pytest.raises(SecateursError, match="inputs for each task"):
        adamerge(model, base, vectors, inputs[:1])
    with pytest.raises(SecateursError):
        AdaMerging(granularity="block")
    with pytest.raises(SecateursError, match="no tensor weight"):
        adamerge(model, base, [{"w": torch.zeros(4, 3)}], inputs[:1])
