"""OWL (Yin et al., 2024, "Outlier Weighed Layerwise sparsity"): prune outlier-rich decoder layers less.

From one pass through the *dense* model, each decoder layer's outlier ratio D_l is the fraction of its Wanda scores
|W_ij| * ||X_j|| (all its linears together) above M times their mean. D is min-max scaled to [0, 2*lambda] and
centred on its mean; layer l keeps density (1 - target) + scaled_l, so outlier-rich layers are pruned less and the
mean sparsity over layers equals the target exactly. Paper defaults: M = 5, lambda = 0.08.

``lam="auto"`` (``--owl-lambda auto``, and ``m="auto"``, ``--owl-m auto``) chooses lambda (and M) for the model and
recipe at hand: a ``holdout`` fraction of the calibration windows is held apart, the model is pruned on the rest once
per candidate of :data:`LAMBDAS` (x :data:`MS`), lambda = 0 (uniform) included, and the candidate with the lowest
perplexity on the held-out windows is used for the real run on every window (:mod:`secateurs.oneshot.search`). So the
allocation is uniform unless a non-uniform one measured better on text the pruning did not see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from secateurs.errors import SecateursError
from secateurs.oneshot.pruners.wanda import wanda_scores
from secateurs.oneshot.stage import SUM_SQUARES, Allocation, option

LAMBDAS = (0.0, 0.04, 0.08, 0.12)  # the candidates of lam="auto" (0: uniform)
MS = (3.0, 5.0, 7.0, 10.0)  # the candidates of m="auto"


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

    m: float | str = option(5.0, "a Wanda score is an outlier above M x the layer's mean score (auto: searched)")
    lam: float | str = option(
        0.08,
        "layer sparsities span target +- lambda (auto: chosen by held-out perplexity, 0 included)",
        flag="--owl-lambda",
    )
    holdout: float = option(0.25, "with auto: the fraction of calibration windows held apart to choose by")

    def __post_init__(self) -> None:
        m = 5.0 if self.m == "auto" else self.m
        lam = 0.0 if self.lam == "auto" else self.lam
        self.check(m > 0 and 0 <= lam < 0.5, f"need m > 0 and 0 <= lambda < 0.5, got {self.m}, {self.lam}")
        self.check(0 < self.holdout < 1, f"holdout must be in (0, 1), got {self.holdout}")

    @property
    def searching(self) -> bool:
        """Whether lambda or M is "auto" (to be chosen by :func:`secateurs.oneshot.search.search_owl`)."""
        return self.m == "auto" or self.lam == "auto"

    def candidates(self) -> list[tuple[float, float]]:
        """(M, lambda) pairs to try: lambda = 0 once (M does not matter there), then every other pair."""
        ms = MS if self.m == "auto" else (self.m,)
        lams = LAMBDAS if self.lam == "auto" else (self.lam,)
        pairs = [(m, lam) for lam in lams for m in ms if lam > 0]
        return ([(ms[0] if len(ms) == 1 else 5.0, 0.0)] if 0.0 in lams else []) + pairs

    def measure(self, weights: dict[str, torch.Tensor], stats: dict) -> dict:
        scores = [wanda_scores(W, stats[n].sq_norm, stats[n].nsamples) for n, W in weights.items()]
        return {"outlier_ratio": outlier_ratio(scores, 5.0 if self.m == "auto" else self.m)}

    def allocate(self, target: float, layer_names: list[str], measures: list[dict] | None) -> list[float]:
        if self.searching:
            raise SecateursError("OWL with auto settings is resolved by the search before allocating")
        return owl_sparsities([m["outlier_ratio"] for m in measures], target, self.lam)
