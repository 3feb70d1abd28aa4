"""Choose OWL's lambda (and M) for the model and recipe at hand, by perplexity on calibration windows held apart.

The last ``holdout`` fraction of the calibration windows (at least one) is held apart; the rest calibrate. One pass
through the dense model measures every layer's outlier ratio for each candidate M; then, for each candidate
(M, lambda), the decoder layers are pruned with the recipe's own stages at that allocation and the held-out windows
are scored (mean NLL, batch 1), after which the dense weights are put back. The candidate with the lowest held-out
perplexity wins; a tie goes to the earlier candidate, and lambda = 0 (uniform) comes first. The real run then prunes
with the chosen settings on every calibration window.

Cost: one dense pass and one pruning walk per candidate on 1 - holdout of the windows, plus the held-out scoring:
about ``len(candidates)`` times the run itself. Memory: one copy of the decoder layers' linear weights (the model
must be in memory: not with ``--low-memory``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.evaluate.perplexity import window_nll
from secateurs.models import find_layers
from secateurs.oneshot.allocations.owl import OWL, outlier_ratio, owl_sparsities
from secateurs.oneshot.moe import restore_linears, snapshot_linears
from secateurs.oneshot.pruners.wanda import wanda_scores
from secateurs.oneshot.walk import LinearStages, dense_walk, walk

log = logging.getLogger(__name__)


def split_holdout(windows: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration part, held-out part): the last round(n * fraction) windows, at least one, are held out."""
    n = len(windows)
    held = min(max(1, round(n * fraction)), n - 1)
    if n < 2:
        raise SecateursError(
            "choosing OWL's settings (auto) holds calibration windows apart and needs at least 2 windows"
        )
    return windows[: n - held], windows[n - held :]


@torch.no_grad()
def search_owl(
    model: nn.Module,
    owl: OWL,
    stages: LinearStages,
    layer_targets,
    target: float,
    windows: torch.Tensor,
    device: torch.device,
    *,
    skip=lambda name: False,
    progress: bool = True,
    batch: int = 1,
) -> tuple[OWL, dict]:
    """The OWL allocation with its auto settings chosen, and the search's record (candidates and their scores).

    ``layer_targets(sparsities)`` turns per-layer sparsities into the walk's targets (N:M rounding included).
    """
    start = time.perf_counter()
    calib, held = split_holdout(windows, owl.holdout)
    candidates = owl.candidates()
    ms = sorted({m for m, lam in candidates if lam > 0})

    def ratios(index, weights, stats):
        scores = [wanda_scores(W, stats[n].sq_norm, stats[n].nsamples) for n, W in weights.items()]
        return {m: outlier_ratio(scores, m) for m in ms}

    measured = (
        dense_walk(model, calib, device, ratios, wanted=owl.needs, skip=skip, progress=False, batch=batch) if ms else []
    )
    layers = find_layers(model)[1]
    dense = snapshot_linears(model)  # the only tensors pruning changes

    def restore() -> None:
        restore_linears(model, dense)

    rows = []
    try:
        for i, (m, lam) in enumerate(candidates):
            record = {"m": m, "lam": lam}
            try:
                sparsities = (
                    [target] * len(layers) if lam == 0 else owl_sparsities([r[m] for r in measured], target, lam)
                )
            except SecateursError as exc:  # layer sparsities outside [0, 1): not a candidate at this target
                rows.append({**record, "skipped": str(exc)})
                continue
            began = time.perf_counter()
            targets = layer_targets(sparsities)
            walk(model, stages, targets, calib, device, skip=skip, track_error=False, progress=False, batch=batch)
            model_device = next(model.parameters()).device
            nll = sum(window_nll(model, row, model_device) for row in held) / len(held)
            restore()
            rows.append({**record, "heldout_ppl": math.exp(nll), "seconds": time.perf_counter() - began})
            if progress:
                log.info(
                    "OWL search %d/%d: M %g, lambda %g: held-out perplexity %.3f",
                    i + 1,
                    len(candidates),
                    m,
                    lam,
                    rows[-1]["heldout_ppl"],
                )
    finally:
        restore()  # the dense model back, even after an error
    scored = [r for r in rows if "heldout_ppl" in r]
    if not scored:
        raise SecateursError(f"no OWL candidate fits target {target}: {rows[0]['skipped']}")
    best = min(scored, key=lambda r: r["heldout_ppl"])  # min keeps the first of equals: lambda 0 first
    chosen = replace(owl, m=best["m"], lam=best["lam"])
    log.info("OWL search chose M %g, lambda %g (held-out perplexity %.3f)", best["m"], best["lam"], best["heldout_ppl"])
    return chosen, {
        "chosen": {"m": best["m"], "lam": best["lam"]},
        "candidates": rows,
        "calibration_windows": len(calib),
        "heldout_windows": len(held),
        "seconds": time.perf_counter() - start,
    }
