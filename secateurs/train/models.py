"""Small plain models to sparse-train on :mod:`secateurs.train.data`: an MLP and a 1/2/3-D CNN.

Built from ``nn.Linear`` and ``nn.Conv*d`` only, with readable module names (``layers.0``, ``features.conv2``,
``classifier``), so sparse training can pick them by glob.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.train.data import ImageData

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


class MLP(nn.Module):
    """LeNet-300-100 style: flatten, then ``Linear`` + ReLU per hidden width, then a ``Linear`` classifier."""

    def __init__(self, in_features: int, classes: int, hidden: Sequence[int] = (300, 100)) -> None:
        super().__init__()
        self.arguments = {"in_features": int(in_features), "classes": int(classes), "hidden": [int(h) for h in hidden]}
        widths = [in_features, *hidden]
        blocks: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            blocks += [nn.Linear(a, b), nn.ReLU()]
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(*blocks)
        self.classifier = nn.Linear(widths[-1], classes)

    def architecture(self) -> dict:
        """How to build this model again (saved with a sparse checkpoint: a name and plain arguments, no code)."""
        return {"name": "mlp", "arguments": dict(self.arguments)}

    @classmethod
    def for_data(cls, data: ImageData, **kwargs: Any) -> MLP:
        return cls(data.in_features, data.classes, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers(self.flatten(x)))


class SmallCNN(nn.Module):
    """Three conv blocks (conv, BatchNorm, ReLU; a 2x max pool after the second), global average pool, ``Linear``.

    ``dims`` picks Conv1d / Conv2d / Conv3d for inputs ``[N, C, L]``, ``[N, C, H, W]`` or ``[N, C, D, H, W]``.
    Widths are ``width``, ``width``, ``2 * width``: ``conv2`` and ``conv3`` map channels to channels, where
    kernel-level sparsity means something. Works on 8x8 digits (the pool rounds up, so even size 1 passes).
    """

    def __init__(self, in_channels: int, classes: int, width: int = 32, dims: int = 2) -> None:
        super().__init__()
        if dims not in CONV:
            raise SecateursError(f"SmallCNN dims must be 1, 2 or 3, got {dims}")
        self.arguments = {"in_channels": int(in_channels), "classes": int(classes), "width": int(width), "dims": dims}
        conv, norm = CONV[dims], NORM[dims]

        def block(a: int, b: int) -> list[nn.Module]:
            return [conv(a, b, kernel_size=3, padding=1, bias=False), norm(b), nn.ReLU()]

        names = ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "pool", "conv3", "bn3", "relu3"]
        modules = [*block(in_channels, width), *block(width, width), POOL[dims](2, ceil_mode=True)]
        modules += block(width, 2 * width)
        self.features = nn.Sequential(OrderedDict(zip(names, modules, strict=True)))
        self.classifier = nn.Linear(2 * width, classes)

    def architecture(self) -> dict:
        """How to build this model again (saved with a sparse checkpoint: a name and plain arguments, no code)."""
        return {"name": "cnn", "arguments": dict(self.arguments)}

    @classmethod
    def for_data(cls, data: ImageData, **kwargs: Any) -> SmallCNN:
        kwargs.setdefault("dims", len(data.input_shape) - 1)
        return cls(data.in_channels, data.classes, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.classifier(h.flatten(2).mean(dim=2))


MODELS: dict[str, type[MLP] | type[SmallCNN]] = {"mlp": MLP, "cnn": SmallCNN}


def build_model(name: str, data: ImageData, **kwargs: Any) -> nn.Module:
    """The model ``name`` (a key of :data:`MODELS`) sized for ``data``'s input shape and classes."""
    key = name.strip().lower()
    if key not in MODELS:
        raise SecateursError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[key].for_data(data, **kwargs)


def from_architecture(spec) -> nn.Module:
    """The model an ``architecture()`` record describes ({"name": "mlp" or "cnn", "arguments": {...}}), freshly
    initialised. Only the models of :data:`MODELS` can be named, so a file never chooses code to run."""
    if not isinstance(spec, dict) or not isinstance(spec.get("arguments"), dict):
        raise SecateursError(f"malformed architecture record: {spec!r}")
    name = spec.get("name")
    if name not in MODELS:
        raise SecateursError(f"unknown architecture {name!r}; known: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](**spec["arguments"])
    except (TypeError, ValueError) as exc:
        raise SecateursError(f"architecture {name}: bad arguments {spec['arguments']}: {exc}") from None
