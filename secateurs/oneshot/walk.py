"""The sequential walk shared by every stage and every architecture.

1. :func:`~secateurs.oneshot.capture.capture` records what each decoder layer is called with.
2. For each decoder layer: move it to the compute device, hook its linears, run the inputs through it to sum the
   input statistics the recipe's stages declare, run the linear stages on every linear (pruner, then refiner, then
   weight update), run the inputs again through the now sparse layer to produce the next layer's inputs, move it
   back, free the statistics.

On several processes (:mod:`secateurs.oneshot.distributed`) each runs its share of the windows and the statistics are
summed over them before any stage runs. With a :class:`~secateurs.oneshot.resume.RunState`, every finished layer is
saved, and a stopped run continues after the last one (:mod:`secateurs.oneshot.resume`).

The walk never asks which method it runs: it reads each stage's ``needs`` and calls its one function.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.measure import give_back_memory
from secateurs.models import find_layers, weight_view
from secateurs.oneshot.capture import capture, layer_output
from secateurs.oneshot.distributed import Ranks
from secateurs.oneshot.moe import layer_linears, prune_unrouted, unrouted, with_expert_linears
from secateurs.oneshot.result import LayerResult, LinearResult, PackedMask
from secateurs.oneshot.resume import RunState, restore_rng
from secateurs.oneshot.stage import Pruner, Refiner, StageOutput, Target, Update
from secateurs.oneshot.stats import InputStats, StatsCollector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearStages:
    """What runs on every pruned linear, in order: a pruner, then optionally a refiner and a weight update."""

    pruner: Pruner
    refiner: Refiner | None = None
    update: Update | None = None
    unrouted: str = "dense"  # an MoE expert without calibration tokens: "dense" or "magnitude"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(s.needs for s in (self.pruner, self.refiner, self.update) if s is not None))

    @property
    def label(self) -> str:
        return " + ".join(s.name for s in (self.pruner, self.refiner, self.update) if s is not None)


class InMemory:
    """Where the walk finds decoder layers by default: in the model, moved to the compute device for their turn and
    back afterwards. (:class:`secateurs.oneshot.streaming.Streamed` reads and writes them from disk instead.)"""

    def prepare(self, layers: nn.ModuleList) -> None:
        pass

    def enter(self, index: int, layer: nn.Module, device: torch.device) -> None:
        self.home = next(layer.parameters()).device
        layer.to(device)

    def leave(self, index: int, layer: nn.Module, final: bool) -> None:
        layer.to(self.home)


class Parking:
    """Where the calibration hidden states wait between layers: on the compute device, or (``offload``, when that is a
    GPU) in pinned CPU memory, each window moved to the GPU only for its turn through the layer."""

    def __init__(self, device: torch.device, offload: bool = False):
        self.device, self.offload = device, offload and device.type == "cuda"

    def park(self, h: torch.Tensor) -> torch.Tensor:
        return h.to("cpu").pin_memory() if self.offload else h

    def fetch(self, h: torch.Tensor) -> torch.Tensor:
        return h.to(self.device, non_blocking=True) if self.offload else h

    def park_all(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.park(h) for h in hidden] if self.offload else hidden


def prunable_linears(layer: nn.Module, prefix: str, skip: Callable[[str], bool]) -> dict[str, nn.Module]:
    """The linears of one decoder layer (names relative to it) whose full name ``prefix.name`` is not skipped
    (each MoE expert's as its own, routers left out: :func:`secateurs.oneshot.moe.layer_linears`)."""
    return {n: m for n, m in layer_linears(layer).items() if not skip(f"{prefix}.{n}")}


def _run_collecting(layer, linears, hidden, calls, wanted, keep_outputs: bool, ranks: Ranks, parking: Parking):
    """Run every window through ``layer`` with hooks summing the ``wanted`` statistics of each linear's inputs; the
    sums are then summed over the ranks and rounded to fp32."""
    stats = {n: InputStats() for n in linears}
    collector = StatsCollector(stats, wanted)
    hooks = [m.register_forward_hook(collector.hook(n)) for n, m in linears.items()]
    outputs = []
    try:
        for h, call in zip(hidden, calls, strict=True):
            collector.windows = h.shape[0]  # a batch of windows: their sums are added window by window
            out = layer_output(call(layer, parking.fetch(h)))
            collector.next_window()
            if keep_outputs:
                outputs.append(parking.park(out))
    finally:
        for hook in hooks:
            hook.remove()
    distinct = {id(s): (s, weight_view(linears[n]).shape[1]) for n, s in stats.items()}  # shared inputs: once
    ranks.sum_stats(distinct.values())
    for s, _ in distinct.values():
        s.finish()
    return stats, outputs


def run_stages(
    name: str, W: torch.Tensor, stages: LinearStages, stats: InputStats | None, target: Target
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The linear stages on one weight [rows, cols]: returns (new weight, mask True = pruned, details).

    Pruned positions are exactly zero after every stage; the weight keeps its dtype. The dense weight is copied
    only when a refiner or an update will read it.
    """
    if unrouted(stats):  # an MoE expert no calibration token was routed to: no statistics to prune it by
        return prune_unrouted(W, target, stages.unrouted)
    later = [s for s in (stages.refiner, stages.update) if s is not None and _applies(s, name)]
    W_dense = W.detach().clone() if later else None
    out = _checked(stages.pruner, stages.pruner.prune(W.detach().clone(), stats, target), W, W_dense)
    weight, mask, info = out.weight, out.mask, dict(out.info)
    for stage in later:
        if isinstance(stage, Refiner):
            out = stage.refine(W_dense, weight, mask, stats, target, pruner=stages.pruner)
        else:
            out = stage.update(W_dense, weight, mask, stats, target)
        out = _checked(stage, out, W, W_dense)
        weight, mask = out.weight, out.mask
        info[stage.name] = out.info
    return weight, mask, info


def _applies(stage, name: str) -> bool:
    return not isinstance(stage, Refiner) or stage.applies(name)


def _checked(stage, out: StageOutput, W: torch.Tensor, W_dense: torch.Tensor | None) -> StageOutput:
    """Hold every stage to the contract: same shape, W's dtype, a bool mask, exact zeros where pruned.

    A weight returned as the dense copy itself is copied before its pruned positions are zeroed, so later stages
    still see the dense values.
    """
    if out.weight.shape != W.shape or out.mask.shape != W.shape or out.mask.dtype != torch.bool:
        raise RuntimeError(f"{stage.kind} {stage.name} returned a weight or mask of the wrong shape or type")
    weight = out.weight.to(W.dtype)
    if W_dense is not None and weight.data_ptr() == W_dense.data_ptr():
        weight = weight.clone()
    weight[out.mask] = 0
    return StageOutput(weight, out.mask, out.info)


@torch.no_grad()
@with_expert_linears
def dense_walk(
    model: nn.Module,
    calibration: torch.Tensor,
    device: torch.device,
    per_layer: Callable[[int, dict[str, torch.Tensor], dict[str, InputStats]], object],
    *,
    wanted: frozenset[str],
    skip: Callable[[str], bool] = lambda name: False,
    progress: bool = True,
    ranks: Ranks | None = None,
    residence: InMemory | None = None,
    offload: bool = False,
    batch: int = 1,
) -> list:
    """One pass through the dense model: ``per_layer(index, weights, stats)`` for each decoder layer.

    ``weights`` maps each prunable linear of the layer to its weight [rows, cols]; ``stats`` holds the ``wanted``
    sums of its inputs, from the dense model's own activations (nothing is pruned), e.g. for OWL's outlier ratios.
    """
    ranks, residence = ranks or Ranks.current(), residence or InMemory()
    layers_name, layers = find_layers(model)
    residence.prepare(layers)
    parking = Parking(device, offload)
    hidden, calls = capture(model, calibration, device, progress, batch)
    hidden = parking.park_all(hidden)
    results = []
    for index in tqdm(range(len(layers)), desc="dense statistics", disable=not progress):
        layer = layers[index]
        residence.enter(index, layer, device)
        linears = prunable_linears(layer, f"{layers_name}.{index}", skip)
        stats, hidden = _run_collecting(layer, linears, hidden, calls[index], wanted, True, ranks, parking)
        calls[index] = None
        linears = {n: m for n, m in linears.items() if not unrouted(stats[n])}  # experts without tokens: unmeasured
        results.append(per_layer(index, {n: weight_view(m) for n, m in linears.items()}, stats))
        residence.leave(index, layer, final=False)
    return results


@torch.no_grad()
@with_expert_linears
def walk(
    model: nn.Module,
    stages: LinearStages,
    targets: list[Target],
    calibration: torch.Tensor | None,
    device: torch.device,
    *,
    skip: Callable[[str], bool] = lambda name: False,
    track_error: bool = True,
    progress: bool = True,
    ranks: Ranks | None = None,
    state: RunState | None = None,
    residence: InMemory | None = None,
    offload: bool = False,
    batch: int = 1,
) -> tuple[list[LayerResult], dict[str, PackedMask]]:
    """Prune every decoder layer in order, layer ``i`` to ``targets[i]``; return the results and the masks.

    ``calibration`` holds this rank's share of the windows; ``state`` (if given) records each finished layer, and
    the layers it already holds are restored rather than pruned again. ``offload`` keeps the hidden states in CPU
    memory between layers when the compute device is a GPU. ``batch`` windows go through each layer at once (their
    statistics are still added window by window).
    """
    ranks, residence = ranks or Ranks.current(), residence or InMemory()
    layers_name, layers = find_layers(model)
    if len(targets) != len(layers):
        raise ValueError(f"{len(targets)} layer targets for {len(layers)} layers")
    wanted = stages.needs
    hidden = calls = None
    parking = Parking(device, offload)
    if wanted:
        residence.prepare(layers)
        hidden, calls = capture(model, calibration, device, progress, batch)
        hidden = parking.park_all(hidden)
    results, masks = [], {}
    first = 0
    if state is not None and state.done:
        first = _restore(layers, layers_name, skip, state, ranks, residence, parking, (hidden, calls), results, masks)
    bar = tqdm(range(first, len(layers)), desc=f"{stages.label} pruning layers", disable=not progress)
    for index in bar:
        start = time.perf_counter()
        layer = layers[index]
        residence.enter(index, layer, device)
        linears = prunable_linears(layer, f"{layers_name}.{index}", skip)
        stats: dict[str, InputStats] = {}
        dense_out = []
        if wanted:
            stats, dense_out = _run_collecting(
                layer, linears, hidden, calls[index], wanted, track_error, ranks, parking
            )
        target = targets[index]
        target_sparsity = target.nm.sparsity if target.nm else target.sparsity
        linear_results = []
        for name, module in linears.items():
            full = f"{layers_name}.{index}.{name}"
            W = weight_view(module)
            weight, mask, info = run_stages(full, W, stages, stats.pop(name, None), target)
            W.copy_(weight)
            del weight
            give_back_memory()  # each stage's scratch: otherwise the heap keeps the largest linear's few times over
            packed = PackedMask.pack(mask)
            masks[full] = packed
            linear_results.append(
                LinearResult(
                    name=full,
                    shape=tuple(W.shape),
                    sparsity_target=target_sparsity,
                    pruned=int(mask.sum().item()),
                    zeros=int((W == 0).sum().item()),
                    numel=W.numel(),
                    mask_sha256=packed.digest(),
                    info=info,
                )
            )
        error = None
        if wanted:
            num = den = 0.0
            for j, call in enumerate(calls[index]):
                out = layer_output(call(layer, parking.fetch(hidden[j])))
                if track_error:
                    ref = parking.fetch(dense_out[j]).float()
                    num += (out.float() - ref).pow(2).sum().item()
                    den += ref.pow(2).sum().item()
                hidden[j] = parking.park(out)
            calls[index] = None
            num, den = ranks.sum_floats(num, den)
            error = num / den if track_error and den > 0 else None
        del dense_out, stats
        result = LayerResult(
            index, f"{layers_name}.{index}", target_sparsity, error, time.perf_counter() - start, linear_results
        )
        results.append(result)
        if state is not None:
            prefix = f"{layers_name}.{index}"
            weights = {f"{prefix}.{n}": weight_view(m) for n, m in linears.items()}
            state.save_layer(index, weights, {n: masks[n] for n in weights}, result)
        residence.leave(index, layer, final=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results, masks


def _restore(layers, layers_name, skip, state: RunState, ranks: Ranks, residence, parking, inputs, results, masks):
    """Put back the layers a stopped run finished (rank 0 reads them and sends them to the others) and recompute
    the hidden states entering the next layer through them; returns the index of the first layer left to prune."""
    hidden, calls = inputs
    rng = {}
    for index in tqdm(range(state.done), desc="restoring finished layers", disable=not ranks.main):
        layer = layers[index]
        prefix = f"{layers_name}.{index}"
        weights, layer_masks, result, rng = ranks.broadcast(state.load_layer(index) if ranks.main else None)
        residence.enter(index, layer, parking.device)
        for name, module in prunable_linears(layer, prefix, skip).items():
            weight_view(module).copy_(weights[f"{prefix}.{name}"])
        masks.update(layer_masks)
        results.append(result)
        if hidden is not None:
            for j, call in enumerate(calls[index]):
                hidden[j] = parking.park(layer_output(call(layer, parking.fetch(hidden[j]))))
            calls[index] = None
        residence.leave(index, layer, final=True)
    restore_rng(rng)
    return state.done
