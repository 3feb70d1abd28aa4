"""OWL (Yin et al., 2024, "Outlier Weighed Layerwise sparsity"): prune outlier-rich decoder layers less.

From one pass through the *dense* model, each decoder layer's outlier ratio D_l is the fraction of its Wanda scores
|W_ij| * ||X_j|| (all its linears together) above M times their mean. D is min-max scaled to [0, 2*lambda] and
centred on its mean; layer l keeps density (1 - target) + scaled_l, so outlier-rich layers are pruned less and the
mean sparsity over layers equals the target exactly. Paper defaults: M = 5, lambda = 0.08.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from secateurs.errors import SecateursError
from secateurs.oneshot.pruners.wanda import wanda_scores
from secateurs.oneshot.stage import SUM_SQUARES, Allocation, option


def outlier_ratio(scores: Sequence[torch.Tensor], M: float = 5.0) -> float:
    """Fraction of all entries of ``scores`` (concatenated) above M x their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return (flat > M * flat.mean()).float().mean().item()


def owl_sparsities(ratios: Sequence[float], target: float, lam: float = 0.08) -> list[float]:
    """Per-layer sparsity from outlier ratios: mean equals ``target``, range 2*lam, more outliers -> less."""
    D = torch.tensor(ratios, dtype=torch.float64)
    spread = (D.max() - D.min()).item()
    if spread == 0:
        return [float(target)] * len(ratios)
    scaled = (D - D.min()) / spread * (2 * lam)
    sparsity = target - (scaled - scaled.mean())
    if sparsity.min() < 0 or sparsity.max() >= 1:
        raise SecateursError(
            f"OWL with target {target} and lambda {lam} gives layer sparsities outside [0, 1) "
            f"({sparsity.min():.3f} .. {sparsity.max():.3f}); lower --owl-lambda"
        )
    return sparsity.tolist()


@dataclass(frozen=True)
class OWL(Allocation):
    name: ClassVar[str] = "owl"
    summary: ClassVar[str] = "outlier-weighed: layers with more activation outliers get less sparsity (one dense pass)"
    needs: ClassVar[frozenset[str]] = frozenset({SUM_SQUARES})

    m: float = option(5.0, "a Wanda score is an outlier above M x the layer's mean score")
    lam: float = option(0.08, "layer sparsities span target +- lambda", flag="--owl-lambda")

    def __post_init__(self) -> None:
        self.check(self.m > 0 and 0 <= self.lam < 0.5, f"need m > 0 and 0 <= lambda < 0.5, got {self.m}, {self.lam}")

    def measure(self, weights: dict[str, torch.Tensor], stats: dict) -> dict:
        scores = [wanda_scores(W, stats[n].sq_norm, stats[n].nsamples) for n, W in weights.items()]
        return {"outlier_ratio": outlier_ratio(scores, self.m)}

    def allocate(self, target: float, layer_names: list[str], measures: list[dict] | None) -> list[float]:
        return owl_sparsities([m["outlier_ratio"] for m in measures], target, self.lam)
