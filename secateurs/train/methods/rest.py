"""REST (Zhao et al. 2023, "REST: Enhancing Group Robustness in DNNs through Reweighted Sparse Training").

Sparse training in which bias-conflicting samples are drawn more often, so the sparse sub-network relies less
on a spurious feature. As in the reference (github.com/zhao1402072392/REST): a sample is bias-conflicting when
its bias attribute (e.g. the colour) disagrees with its label, known from the data set's group labels
(``data/cmnist_dataset.py``); the training loader draws samples with replacement with weight ``upweight``
(80 there) for conflicting samples and 1 for aligned ones (``data/dro_dataset.py``, ``WeightedRandomSampler``);
the loss is the plain mean cross-entropy; the mask is trained RigL-style from an ERK random start (drop by
magnitude, grow by dense gradient, drop fraction 0.5 decayed by a cosine, ``sparselearning/core.py``).
Differences: the reference counts drops with ceil and decays to 0.005; here floor and 0, like RigL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateurs.errors import SecateursError
from secateurs.oneshot.stage import option
from secateurs.train.methods.rigl import RigL


@dataclass(frozen=True)
class REST(RigL):
    """RigL-style sparse training on a loader that up-weights bias-conflicting samples."""

    name: ClassVar[str] = "rest"
    summary: ClassVar[str] = "sparse training with bias-conflicting samples drawn more often (Zhao et al.)"

    alpha: float = option(0.5, "initial update fraction, decayed by a cosine to 0 at end")
    end: float = option(1.0, "last mask update, as a fraction of the run")
    upweight: float = option(80.0, "how much more often a bias-conflicting sample is drawn than an aligned one")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.upweight >= 1, f"upweight must be >= 1, got {self.upweight}")

    def sample_weights(self, conflicting: torch.Tensor) -> torch.Tensor:
        """One drawing weight per training sample: ``upweight`` if bias-conflicting, else 1."""
        conflicting = torch.as_tensor(conflicting, dtype=torch.bool)
        if conflicting.dim() != 1 or conflicting.numel() == 0:
            raise SecateursError("rest needs one bias-conflicting flag per training sample")
        return torch.where(conflicting, self.upweight, 1.0).double()

    def sampler(
        self, conflicting: torch.Tensor, generator: torch.Generator, num_samples: int | None = None
    ) -> torch.utils.data.WeightedRandomSampler:
        """The reweighted training sampler: as many draws as samples (with replacement), seeded."""
        weights = self.sample_weights(conflicting)
        n = num_samples or weights.numel()
        return torch.utils.data.WeightedRandomSampler(weights, n, replacement=True, generator=generator)
