"""``prune(model, recipe, calibration)``: allocate per-layer targets, walk the decoder, report what was done."""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from secateurs import data
from secateurs.data.calibration import Calibration
from secateurs.errors import SecateursError
from secateurs.measure import PeakMemory, give_back_memory
from secateurs.models import check_seqlen, default_device, find_layers, weight_view
from secateurs.oneshot.allocations.owl import OWL
from secateurs.oneshot.allocations.table import Table
from secateurs.oneshot.allocations.uniform import Uniform
from secateurs.oneshot.distributed import Ranks, digest
from secateurs.oneshot.moe import has_experts, layer_linears, warn_unrouted
from secateurs.oneshot.recipe import Recipe
from secateurs.oneshot.result import PruneReport
from secateurs.oneshot.resume import RunState, model_fingerprint
from secateurs.oneshot.search import search_owl
from secateurs.oneshot.select import nm_per_layer
from secateurs.oneshot.stage import Target
from secateurs.oneshot.walk import InMemory, LinearStages, dense_walk, prunable_linears, walk

log = logging.getLogger(__name__)


def as_recipe(recipe: Recipe | str | dict) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe(method=recipe)


def check_recipe(model: nn.Module, recipe: Recipe) -> None:
    """Every check that needs only the model's shapes and the recipe: run before any forward pass."""
    layers_name, layers = find_layers(model)
    if recipe.exclude and all(recipe.excluded(n) for n in linear_names(model)):
        raise SecateursError(f"--exclude {' '.join(recipe.exclude)} matches every prunable linear: nothing to prune")
    if isinstance(recipe.allocation, Table):
        recipe.allocation.check_file()
        recipe.allocation.allocate(recipe.sparsity, [f"{layers_name}.{i}" for i in range(len(layers))], None)
    nm = recipe.nm
    if nm is None:
        return
    checked, bad = 0, {}
    for index, layer in enumerate(layers):
        for name, module in prunable_linears(layer, f"{layers_name}.{index}", recipe.excluded).items():
            cols = weight_view(module).shape[1]
            checked += 1
            if cols % nm.m:
                bad[f"{layers_name}.{index}.{name}"] = cols
    if not bad:
        return
    if len(bad) == checked:
        widths = ", ".join(str(w) for w in sorted(set(bad.values())))
        raise SecateursError(
            f"N:M pattern {nm} needs input widths divisible by {nm.m}, and no prunable linear has one "
            f"(every linear's width is one of {widths}): choose M dividing them"
        )
    (first, cols), more = next(iter(bad.items())), len(bad) - 1
    also = f" (and {more} more linear{'s' * (more != 1)}: {', '.join(list(bad)[1:4])}{', ...' if more > 3 else ''})"
    raise SecateursError(
        f"N:M pattern {nm} needs input widths divisible by {nm.m}, but {first} has {cols}{also if more else ''}; "
        f"exclude them (exclude=['{first}', ...] / --exclude) to leave them dense"
    )


def linear_names(model: nn.Module) -> list[str]:
    """Full names of every linear in the decoder layers (what the walk may prune)."""
    layers_name, layers = find_layers(model)
    return [f"{layers_name}.{i}.{n}" for i, layer in enumerate(layers) for n in layer_linears(layer)]


def warn_unused_exclusions(model: nn.Module, recipe: Recipe) -> None:
    names = linear_names(model)
    for pattern in recipe.exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            log.warning("--exclude %r matches no linear (names look like %s)", pattern, names[0])


def layer_targets(recipe: Recipe, sparsities: list[float]) -> list[Target]:
    """One target per layer; with N:M and a non-uniform allocation, N_l rounds M * sparsity_l (mean kept)."""
    nm = recipe.nm
    if nm is None:
        return [Target(s) for s in sparsities]
    if recipe.allocation.name == "uniform":
        return [Target(nm.sparsity, nm)] * len(sparsities)
    return [Target(p.sparsity, p) for p in nm_per_layer(sparsities, nm.m)]


def calibration_windows(model, recipe: Recipe, calibration, tokenizer) -> tuple[torch.Tensor | None, dict | None]:
    """The token windows [nsamples, seqlen] the stages need (None when none needs data), and their description."""
    if not recipe.needs_calibration:
        return None, None
    if calibration is None:
        calibration = Calibration()
    if isinstance(calibration, Calibration):
        if tokenizer is None:
            raise SecateursError("a Calibration spec needs the model's tokenizer (tokenizer=...)")
        windows = calibration.windows(tokenizer)
        meta = {**calibration.to_dict(), "description": data.describe_source(calibration.source)}
    else:
        windows = torch.as_tensor(calibration, dtype=torch.long)
        if windows.dim() != 2:
            raise SecateursError(f"calibration windows must be [nsamples, seqlen], got {tuple(windows.shape)}")
        meta = {"source": "tensor", "nsamples": windows.shape[0], "seqlen": windows.shape[1]}
    check_seqlen(model, windows.shape[1])
    return windows, meta


def _open_state(checkpoint, resume: bool, identity: dict, ranks: Ranks) -> RunState | None:
    """Rank 0 opens the run's folder (refusing another run's, naming the difference); every rank learns the outcome."""
    if checkpoint is None:
        if resume:
            raise SecateursError("resume needs the folder of the stopped run (checkpoint=... / --output)")
        return None
    state = RunState(checkpoint, identity, write=ranks.main)
    outcome = None
    if ranks.main:
        try:
            state.open(resume)
            outcome = (state.done, state.allocation, None)
        except SecateursError as exc:
            outcome = (0, None, str(exc))
    state.done, state.allocation, error = ranks.broadcast(outcome)
    if error:
        raise SecateursError(error)
    return state


def prune(
    model: nn.Module,
    recipe: Recipe | str | dict = "wanda",
    calibration: Calibration | torch.Tensor | None = None,
    *,
    tokenizer=None,
    device: str | torch.device | None = "auto",
    track_error: bool = True,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    residence: InMemory | None = None,
    offload_activations: bool = False,
    calibration_batch: int | str = 1,
) -> PruneReport:
    """Prune ``model`` in place, layer by layer, and report what was done (the masks included, packed).

    ``calibration`` is either a :class:`Calibration` (needs ``tokenizer``), a LongTensor of token windows
    [nsamples, seqlen], or None for the bundled default text (magnitude pruning needs no data).

    ``checkpoint``: a folder where every finished decoder layer is saved; with ``resume``, a run stopped there
    (Ctrl-C, a kill, a crash) continues after its last finished layer, with the result an uninterrupted run gives
    (:mod:`secateurs.oneshot.resume`). The folder is kept; remove it once the model is saved.

    Under an initialised torch.distributed process group every rank calls this with the same arguments: each runs
    its share of the windows, the statistics are summed over the ranks, and every rank ends with the same model
    (:mod:`secateurs.oneshot.distributed`); only rank 0 writes the checkpoint.

    ``residence``: where the walk finds the decoder layers (in the model by default; streamed from and to disk by
    :class:`secateurs.oneshot.streaming.Streamed`). ``offload_activations``: on a GPU, keep the calibration hidden
    states in pinned CPU memory between layers (each window visits the GPU for its turn only): GPU memory then
    holds one layer and one window's activations.

    ``calibration_batch``: how many calibration windows go through a layer at once (an integer, or ``"auto"``: as
    many as a quarter of the free memory of the compute device holds, by :func:`choose_batch`). The statistics are
    still summed window by window, so they are the same sums; the forward passes of a batch may round differently
    in the last bits than one window at a time, so masks can differ at near-ties. MoE models run one window at a
    time (their experts see routed tokens, which do not split by window).
    """
    recipe = as_recipe(recipe)
    device = default_device(device) if not isinstance(device, torch.device) else device
    ranks = Ranks.current()
    progress = progress and ranks.main
    check_recipe(model, recipe)
    if ranks.main:
        warn_unused_exclusions(model, recipe)
    windows, calib_meta = calibration_windows(model, recipe, calibration, tokenizer)
    give_back_memory()  # what tokenising the calibration text took
    batch = choose_batch(calibration_batch, model, windows, device)
    if calib_meta is not None and batch > 1:
        calib_meta = {**calib_meta, "batch": batch}
    state = None
    if (
        checkpoint is not None or resume or ranks.several
    ):  # what the run is: compared across ranks and with a stopped run
        identity = {
            "recipe": recipe.to_dict(),
            "calibration window": digest(windows) if windows is not None else None,
            "model": model_fingerprint(model),
            "device type": device.type,
            **({"calibration batch": batch} if batch > 1 else {}),
        }
        ranks.check_same(**identity)
        state = _open_state(checkpoint, resume, identity, ranks)
    if windows is not None and ranks.several:
        windows = windows[ranks.share(len(windows))]
    layers_name, layers = find_layers(model)
    layer_names = [f"{layers_name}.{i}" for i in range(len(layers))]
    allocation = recipe.allocation
    measures = search = None
    stages = LinearStages(recipe.method, recipe.refine, recipe.update, recipe.unrouted_experts)
    start = time.perf_counter()
    was_training = model.training
    model.eval()  # no dropout while collecting statistics
    with PeakMemory() as mem:
        if state is not None and state.allocation is not None:
            sparsities, measures = state.allocation["sparsities"], state.allocation["measures"]
        else:
            if isinstance(allocation, OWL) and allocation.searching:
                _check_search(residence, ranks)
                allocation, search = search_owl(
                    model,
                    allocation,
                    stages,
                    lambda sparsities: layer_targets(recipe, sparsities),
                    recipe.sparsity,
                    windows,
                    device,
                    skip=recipe.excluded,
                    progress=progress,
                    batch=batch,
                )
                if allocation.lam == 0:  # uniform won: OWL's dense pass would measure what nothing uses
                    allocation = Uniform()
            if allocation.needs:
                measures = dense_walk(
                    model,
                    windows,
                    device,
                    lambda index, weights, stats: allocation.measure(weights, stats),
                    wanted=allocation.needs,
                    skip=recipe.excluded,
                    progress=progress,
                    ranks=ranks,
                    residence=residence,
                    offload=offload_activations,
                    batch=batch,
                )
            sparsities = allocation.allocate(recipe.sparsity, layer_names, measures)
            if state is not None:
                state.save_allocation(sparsities, measures)
        results, masks = walk(
            model,
            stages,
            layer_targets(recipe, sparsities),
            windows,
            device,
            skip=recipe.excluded,
            track_error=track_error,
            progress=progress,
            ranks=ranks,
            state=state,
            residence=residence,
            offload=offload_activations,
            batch=batch,
        )
    model.train(was_training)
    if ranks.main:
        warn_unrouted(results)
    seconds = time.perf_counter() - start
    layers_out = []
    for r in results:  # what the allocation measured on a layer (e.g. OWL's outlier_ratio) goes beside it
        layers_out.append({**asdict(r), **(measures[r.index] if measures else {})})
    return PruneReport(
        recipe=recipe.to_dict(),
        calibration=calib_meta,
        device=str(device),
        prune_seconds=seconds,
        rss_before_bytes=mem.start_rss,
        peak_rss_bytes=mem.peak_rss,
        peak_cuda_bytes=mem.peak_cuda,
        layers=layers_out,
        masks=masks,
        allocation_search=search,
    )


def choose_batch(spec: int | str, model: nn.Module, windows: torch.Tensor | None, device: torch.device) -> int:
    """The calibration batch: ``spec`` windows (at most all of them), or for ``"auto"`` as many as fit in a quarter of
    the free memory of ``device`` by a rough estimate of one window's transient activations in a decoder layer
    (4 bytes x seqlen x (4 hidden + 3 MLP width) plus the attention scores, heads x seqlen^2); 1 for MoE models."""
    if windows is None:
        return 1
    if spec == "auto":
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None) or 4096
        width = getattr(config, "intermediate_size", None) or 4 * hidden
        heads = getattr(config, "num_attention_heads", None) or 32
        seqlen = windows.shape[1]
        per_window = 4 * seqlen * (4 * hidden + 3 * width) + 4 * heads * seqlen * seqlen
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            import psutil

            free = psutil.virtual_memory().available
        batch = max(1, int(free // 4 // per_window))
    elif isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1:
        batch = spec
    else:
        raise SecateursError(f"calibration batch must be a positive integer or auto, got {spec!r}")
    batch = min(batch, len(windows))
    if batch > 1 and has_experts(model):
        log.info("calibration batch 1: an MoE model's experts see routed tokens, which do not split by window")
        return 1
    return batch


def _check_search(residence, ranks: Ranks) -> None:
    """OWL's auto settings need the model in memory (its dense weights are put back after each candidate) and one
    process."""
    if residence is not None and type(residence) is not InMemory:
        raise SecateursError("--owl-lambda/--owl-m auto needs the model in memory: not with --low-memory")
    if ranks.several:
        raise SecateursError("--owl-lambda/--owl-m auto runs in one process: not under torchrun")
