"""The public verbs: ``prune`` a model you hold, ``evaluate`` its perplexity."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch
from torch import nn

from secateurs import data
from secateurs.allocation import layer_outlier_ratio, load_allocation, nm_per_layer, owl_sparsities
from secateurs.engine import dense_walk, prunable_linears, walk
from secateurs.errors import SecateursError
from secateurs.evaluate import PerplexityResult, perplexity, wants_bos
from secateurs.evaluate.perplexity import eval_windows
from secateurs.models import check_seqlen, default_device, find_layers, weight_view
from secateurs.recipe import Calibration, Recipe
from secateurs.refine import DSnoTOptions
from secateurs.report import PeakMemory, PruneReport

log = logging.getLogger(__name__)


def _as_recipe(recipe: Recipe | str | dict) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe(method=recipe)


def _check_pattern(model: nn.Module, recipe: Recipe) -> None:
    """Fail before any work if an N:M pattern does not fit some linear's input width."""
    nm = recipe.nm
    if nm is None:
        return
    layers_name, layers = find_layers(model)
    for index, layer in enumerate(layers):
        for name, module in prunable_linears(layer, f"{layers_name}.{index}", recipe.excluded).items():
            full = f"{layers_name}.{index}.{name}"
            cols = weight_view(module).shape[1]
            if cols % nm.m:
                raise SecateursError(
                    f"N:M pattern {nm} needs input widths divisible by {nm.m}, but {full} has {cols}; "
                    f"exclude it (exclude=['{full}'] / --exclude) to leave it dense"
                )


def _refine_options(recipe: Recipe) -> DSnoTOptions | None:
    if recipe.refine != "dsnot":
        return None
    return DSnoTOptions(
        cycles=recipe.dsnot_cycles,
        threshold=recipe.dsnot_threshold,
        power=recipe.dsnot_power,
        targets=tuple(recipe.dsnot_targets),
    )


def prune(
    model: nn.Module,
    recipe: Recipe | str | dict = "wanda",
    calibration: Calibration | torch.Tensor | None = None,
    *,
    tokenizer=None,
    device: str | torch.device | None = "auto",
    track_error: bool = True,
    progress: bool = True,
) -> PruneReport:
    """Prune ``model`` in place, layer by layer, and report what was done.

    ``calibration`` is either a :class:`Calibration` (needs ``tokenizer``), a LongTensor of token windows
    [nsamples, seqlen], or None for the bundled default text (magnitude pruning needs no data).
    """
    recipe = _as_recipe(recipe)
    device = default_device(device) if not isinstance(device, torch.device) else device
    _check_pattern(model, recipe)
    calib_meta = None
    windows = None
    if recipe.needs_calibration:
        if calibration is None:
            calibration = Calibration()
        if isinstance(calibration, Calibration):
            if tokenizer is None:
                raise SecateursError("a Calibration spec needs the model's tokenizer (tokenizer=...)")
            windows = calibration.windows(tokenizer)
            calib_meta = {**calibration.to_dict(), "description": data.describe_source(calibration.source)}
        else:
            windows = torch.as_tensor(calibration, dtype=torch.long)
            if windows.dim() != 2:
                raise SecateursError(f"calibration windows must be [nsamples, seqlen], got {tuple(windows.shape)}")
            calib_meta = {"source": "tensor", "nsamples": windows.shape[0], "seqlen": windows.shape[1]}
        check_seqlen(model, windows.shape[1])
    layers_name, layers = find_layers(model)
    layer_names = [f"{layers_name}.{i}" for i in range(len(layers))]
    ratios = None
    start = time.perf_counter()
    was_training = model.training
    model.eval()  # no dropout while collecting statistics
    with PeakMemory() as mem:
        if recipe.allocation == "uniform":
            sparsities = [recipe.sparsity] * len(layers)
        elif recipe.allocation == "owl":
            ratios = dense_walk(
                model,
                windows,
                device,
                lambda index, linears, stats: layer_outlier_ratio(linears, stats, recipe.owl_m),
                skip=recipe.excluded,
                progress=progress,
            )
            sparsities = owl_sparsities(ratios, recipe.sparsity, recipe.owl_lambda)
        else:
            sparsities = load_allocation(recipe.allocation, layer_names)
        nm = recipe.nm
        if nm is not None and recipe.allocation != "uniform":
            nm = nm_per_layer(sparsities, nm.m)
        results = walk(
            model,
            recipe.method,
            sparsities,
            nm,
            windows,
            device,
            skip=recipe.excluded,
            blocksize=recipe.blocksize,
            percdamp=recipe.percdamp,
            track_error=track_error,
            refine=_refine_options(recipe),
            progress=progress,
        )
    model.train(was_training)
    seconds = time.perf_counter() - start
    return PruneReport(
        recipe=recipe.to_dict(),
        calibration=calib_meta,
        device=str(device),
        prune_seconds=seconds,
        rss_before_bytes=mem.start_rss,
        peak_rss_bytes=mem.peak_rss,
        peak_cuda_bytes=mem.peak_cuda,
        layers=[{**asdict(r), **({"outlier_ratio": ratios[r.index]} if ratios is not None else {})} for r in results],
    )


LOCAL_EVAL_WINDOWS = 40  # default cap for bundled and local text, so the embedded default runs in minutes
C4_EVAL_WINDOWS = 256  # the SparseGPT protocol for C4


def default_eval_windows(source: str) -> int | None:
    """All windows for wikitext2 (paper protocol), 256 for c4, 40 for bundled corpora and local files."""
    if data.source_kind(source) == "hub":
        return C4_EVAL_WINDOWS if data.describe_source(source).startswith("hub:allenai/c4") else None
    return LOCAL_EVAL_WINDOWS


def evaluate(
    model: nn.Module,
    tokenizer,
    source: str = "bible",
    *,
    seqlen: int = 512,
    max_windows: int | None | str = "auto",
    bos: bool | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``source`` with the paper protocol (see :mod:`secateurs.evaluate`).

    ``max_windows``: score at most this many windows; None for all; "auto" for :func:`default_eval_windows`.
    ``bos`` None means: BOS at the start of every window exactly when the tokenizer adds one by default.
    """
    if max_windows == "auto":
        max_windows = default_eval_windows(source)
    check_seqlen(model, seqlen)
    tokens = data.evaluation_tokens(source, tokenizer)
    use_bos = wants_bos(tokenizer) if bos is None else bos
    bos_id = tokenizer.bos_token_id if use_bos else None
    if use_bos and bos_id is None:
        raise SecateursError("BOS requested but the tokenizer has no BOS token")
    windows = eval_windows(tokens, seqlen, bos_id, max_windows)
    available = tokens.numel() // (seqlen - 1 if use_bos else seqlen)
    if device is not None:
        model.to(default_device(device))
    return perplexity(
        model, windows, bos=use_bos, source=data.describe_source(source), available_windows=available, progress=progress
    )
