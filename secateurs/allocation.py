"""How much to prune each decoder layer: uniform, OWL, or a user's own table.

OWL (Yin et al., 2024, "Outlier Weighed Layerwise sparsity"): from one pass through the *dense* model, each
decoder layer's outlier ratio D_l is the fraction of its Wanda scores |W_ij| * ||X_j|| (all its linears
together) above M times their mean. D is min-max scaled to [0, 2*lambda] and centred on its mean; layer l
keeps density (1 - target) + scaled_l, so outlier-rich layers are pruned less and the mean sparsity over
layers equals the target exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from secateurs.errors import SecateursError
from secateurs.methods import wanda_scores
from secateurs.patterns import NM

OWL_M = 5.0  # paper default outlier threshold
OWL_LAMBDA = 0.08  # paper default half-range of the layer sparsities


def outlier_ratio(scores: Sequence[torch.Tensor], M: float = OWL_M) -> float:
    """Fraction of all entries of ``scores`` (concatenated) above M x their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return (flat > M * flat.mean()).float().mean().item()


def layer_outlier_ratio(linears: dict, stats: dict, M: float = OWL_M) -> float:
    """OWL's D_l for one decoder layer, from its linears' weights and dense input statistics."""
    from secateurs.models import weight_view

    return outlier_ratio(
        [wanda_scores(weight_view(m), stats[n].sq_norm, stats[n].nsamples) for n, m in linears.items()], M
    )


def owl_sparsities(ratios: Sequence[float], target: float, lam: float = OWL_LAMBDA) -> list[float]:
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


def nm_per_layer(sparsities: Sequence[float], m: int) -> list[NM]:
    """N:M per layer: layer l zeroes about M * sparsity_l of every M, within [1, M-1].

    Largest-remainder rounding keeps sum(N_l) = round(M * sum(sparsity_l)), so the mean sparsity stays the
    target whenever the clamping to [1, M-1] does not bind.
    """
    wanted = [m * s for s in sparsities]
    n = [int(x) for x in wanted]
    spare = round(sum(wanted)) - sum(n)
    for i in sorted(range(len(n)), key=lambda i: wanted[i] - n[i], reverse=True)[: max(spare, 0)]:
        n[i] += 1
    return [NM(min(max(k, 1), m - 1), m) for k in n]


def load_allocation(path: str | Path, layer_names: Sequence[str]) -> list[float]:
    """A user's table: JSON mapping layer index or name (e.g. "model.layers.3") to its sparsity, every layer given."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SecateursError(f"cannot read allocation file {path}: {exc}") from None
    if isinstance(table, list):
        table = dict(enumerate(table))
    if not isinstance(table, dict):
        raise SecateursError(f"allocation file {path}: expected a JSON object layer -> sparsity, or a list")
    by_index: dict[int, float] = {}
    for key, value in table.items():
        index = int(key) if str(key).isdigit() else (layer_names.index(key) if key in layer_names else None)
        if index is None or not 0 <= index < len(layer_names):
            raise SecateursError(
                f"allocation file {path}: unknown layer {key!r} (layers are 0..{len(layer_names) - 1})"
            )
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise SecateursError(f"allocation file {path}: sparsity of layer {key!r} must be in [0, 1), got {value!r}")
        by_index[index] = float(value)
    missing = [layer_names[i] for i in range(len(layer_names)) if i not in by_index]
    if missing:
        raise SecateursError(f"allocation file {path}: no sparsity for {len(missing)} layer(s), e.g. {missing[0]}")
    return [by_index[i] for i in range(len(layer_names))]
