"""The small models for sparse training: shapes for every conv dimensionality, sizing from data, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.train.data import ImageData, coloured, digits
from secateurs.train.models import MLP, MODELS, SmallCNN, build_model


@pytest.fixture(scope="module")
def data() -> ImageData:
    return digits(seed=0)


def test_mlp_is_lenet_300_100(data):
    model = MLP(64, 10)
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert widths == [(64, 300), (300, 100), (100, 10)]
    assert model(data.train_x[:5]).shape == (5, 10)
    assert [(m.in_features, m.out_features) for m in MLP(4, 2, hidden=()).modules() if isinstance(m, nn.Linear)] == [
        (4, 2)
    ]


@pytest.mark.parametrize(
    ("dims", "shape", "conv"),
    [
        (1, (4, 3, 16), nn.Conv1d),
        (2, (4, 3, 8, 8), nn.Conv2d),
        (3, (4, 3, 4, 6, 5), nn.Conv3d),
        (2, (2, 3, 1, 1), nn.Conv2d),
    ],
)
def test_cnn_shapes_for_every_dims(dims, shape, conv):
    model = SmallCNN(in_channels=3, classes=7, width=8, dims=dims)
    assert model(torch.randn(shape)).shape == (shape[0], 7)
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert len(convs) >= 3 and all(type(c) is conv for c in convs)
    assert sum(c.in_channels > 1 and c.out_channels > 1 for c in convs) >= 2


def test_cnn_on_digits_gray_and_coloured(data):
    gray = build_model("cnn", data, width=8)
    assert gray(data.test_x[:6]).shape == (6, 10)
    assert gray.features.conv1.in_channels == 1 and isinstance(gray.features.conv1, nn.Conv2d)
    biased = coloured(data, 0.95, seed=0)
    model = build_model("CNN", biased, width=8)
    assert model.features.conv1.in_channels == 3 and model(biased.test_x[:6]).shape == (6, 10)


def test_cnn_trains_end_to_end(data):
    torch.manual_seed(0)
    model = build_model("cnn", data, width=8)
    x, y = data.train_x[:64], data.train_y[:64]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_build_mlp_from_data(data):
    model = build_model("mlp", data, hidden=(32,))
    assert isinstance(model, MLP) and model(data.train_x[:3]).shape == (3, 10)
    assert model.layers[0].in_features == 64


def test_registry_and_errors(data):
    assert MODELS == {"mlp": MLP, "cnn": SmallCNN}
    with pytest.raises(SecateursError, match="unknown model 'resnet'; known: cnn, mlp"):
        build_model("resnet", data)
    with pytest.raises(SecateursError, match="dims must be 1, 2 or 3"):
        SmallCNN(1, 10, dims=4)
