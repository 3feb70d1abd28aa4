"""The sequential walk shared by every method and every architecture.

1. Run the calibration windows through the embeddings and record what each decoder layer is called with:
   the hidden states entering the first layer, and every keyword argument of every layer (attention masks,
   position embeddings ... which may differ per layer, e.g. sliding-window layers). Layers are replaced by a
   pass-through while recording, so this costs almost nothing, and no argument is ever rebuilt by hand.
2. For each decoder layer: move it to the compute device, hook its linears, run the inputs through it to
   accumulate statistics (sums over tokens), prune every linear, run the inputs again through the now
   sparse layer to produce the next layer's inputs, move it back, free the statistics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.methods import magnitude_mask, sparsegpt_prune, wanda_mask
from secateurs.models import find_layers, find_linears, weight_view
from secateurs.patterns import NM
from secateurs.refine import DSnoTOptions, dsnot, refined_weight

log = logging.getLogger(__name__)


@dataclass
class InputStats:
    """Sums over calibration tokens of one linear's inputs: reducible across batches and processes."""

    nsamples: int = 0  # calibration windows
    ntokens: int = 0  # calibration tokens
    sq_norm: torch.Tensor | None = None  # sum x_j^2, [cols]
    H_sum: torch.Tensor | None = None  # sum x x^T, [cols, cols] (SparseGPT only)
    x_sum: torch.Tensor | None = None  # sum x_j, [cols] (DSnoT only)

    def add(self, x: torch.Tensor, want_hessian: bool, want_mean: bool = False) -> None:
        self.nsamples += x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.ntokens += x.shape[0]
        sq = (x * x).sum(0)
        self.sq_norm = sq if self.sq_norm is None else self.sq_norm + sq
        if want_hessian:
            xtx = x.t() @ x
            self.H_sum = xtx if self.H_sum is None else self.H_sum + xtx
        if want_mean:
            s = x.sum(0)
            self.x_sum = s if self.x_sum is None else self.x_sum + s

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and (population) variance over all tokens."""
        mean = self.x_sum / self.ntokens
        return mean, (self.sq_norm / self.ntokens - mean * mean).clamp_min(0)


class _StatsCollector:
    """Forward hooks that accumulate each linear's input statistics.

    Linears fed the very same tensor (q/k/v, gate/up) share one statistics object, so the sums (and
    SparseGPT's x x^T) are computed once per distinct input. The inputs seen in the current window are held,
    so their memory cannot be reused by another tensor and mistaken for the same input.
    """

    def __init__(self, stats: dict[str, InputStats], want_hessian: bool, want_mean: bool = False):
        self.stats, self.want_hessian, self.want_mean = stats, want_hessian, want_mean
        self.seen: dict[tuple, tuple[torch.Tensor, InputStats]] = {}

    def hook(self, name: str):
        def accumulate(module, inputs, output):
            x = inputs[0].detach()
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
            if key in self.seen:
                self.stats[name] = self.seen[key][1]
                return
            self.stats[name].add(x, self.want_hessian, self.want_mean)
            self.seen[key] = (x, self.stats[name])

        return accumulate

    def next_window(self) -> None:
        self.seen.clear()


@dataclass
class LinearResult:
    name: str
    shape: tuple[int, int]
    sparsity_target: float
    pruned: int  # weights the method chose to zero
    zeros: int  # weights that are zero afterwards (pruned, plus any that were zero already)
    numel: int
    info: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel


@dataclass
class LayerResult:
    index: int
    name: str
    sparsity_target: float
    output_error: float | None  # ||Y_sparse - Y_dense||^2 / ||Y_dense||^2 on the calibration inputs
    seconds: float
    linears: list[LinearResult]


def prune_linear(
    module: nn.Module,
    method: str,
    sparsity: float,
    nm: NM | None,
    stats: InputStats | None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, dict]:
    """Prune one linear in place; return its pruned mask and method details."""
    W = weight_view(module)
    info: dict = {}
    if method == "magnitude":
        mask = magnitude_mask(W, sparsity, nm)
    elif method == "wanda":
        mask = wanda_mask(W, stats.sq_norm, stats.nsamples, sparsity, nm)
    elif method == "sparsegpt":
        new_W, mask, details = sparsegpt_prune(W, stats.H_sum, stats.nsamples, sparsity, nm, blocksize, percdamp)
        W.copy_(new_W)
        info = {"damping": details.damping, "damping_retries": details.retries, "dead_inputs": details.dead_inputs}
    else:
        raise ValueError(f"unknown method {method!r}")
    W[mask] = 0
    return mask, info


def _refine(W, W_dense, mask, stats: InputStats, nm: NM | None, options: DSnoTOptions):
    """DSnoT on one pruned linear, in place; returns the refined mask and a summary."""
    mean, var = stats.mean_var()
    result = dsnot(
        W_dense,
        W,
        mask,
        mean,
        var,
        stats.sq_norm,
        nm=nm,
        cycles=options.cycles,
        threshold=options.threshold,
        power=options.power,
        scale=stats.ntokens / stats.nsamples,
    )
    W.copy_(refined_weight(W_dense, W, mask, result).to(W.dtype))
    return result.mask, result.summary()


@dataclass
class _Call:
    """The arguments a decoder layer was called with, other than the hidden states."""

    args: tuple
    kwargs: dict

    def __call__(self, layer: Callable, hidden: torch.Tensor):
        return layer(hidden, *self.args, **self.kwargs)


class _Recorder:
    """Stands in for every decoder layer during capture: records the call, passes hidden states through."""

    def __init__(self, layers: nn.ModuleList, keep_inputs_of_first: bool = True):
        self.layers = layers
        self.inputs: list[torch.Tensor] = []  # hidden states entering layer 0, one per window
        self.calls: list[list[_Call]] = [[] for _ in layers]  # per layer, per window: the other arguments
        self.tuple_output: bool | None = None
        self._saved = []

    def __enter__(self):
        for index, layer in enumerate(self.layers):
            self._saved.append(layer.forward)
            layer.forward = self._make(index, layer.forward)
        return self

    def __exit__(self, *exc):
        for layer, forward in zip(self.layers, self._saved, strict=True):
            layer.forward = forward
        self._saved.clear()

    def _make(self, index: int, real_forward: Callable):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            call = _Call(args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            if index == 0:
                self.inputs.append(hidden)
            if self.tuple_output is None:  # learn the layer's output convention from one real call
                self.tuple_output = isinstance(call(real_forward, hidden), tuple)
            self.calls[index].append(call)
            return (hidden,) if self.tuple_output else hidden

        return forward


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class _OnDevice:
    """Move everything except the decoder layers to the compute device, and back afterwards."""

    def __init__(self, model: nn.Module, layers_name: str, device: torch.device):
        self.model, self.layers_name, self.device = model, layers_name, device

    def _move(self, device) -> None:
        parent_name, _, attr = self.layers_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layers = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList())
        try:
            self.model.to(device)
        finally:
            setattr(parent, attr, layers)

    def __enter__(self):
        self.home = next(self.model.parameters()).device
        if self.home != self.device:
            self._move(self.device)
        return self

    def __exit__(self, *exc):
        if self.home != self.device:
            self._move(self.home)


@torch.no_grad()
def capture(model: nn.Module, calibration: torch.Tensor, device: torch.device, progress: bool = True):
    """Record the first layer's input hidden states and every layer's keyword arguments, per window."""
    layers_name, layers = find_layers(model)
    layer0_home = next(layers[0].parameters()).device
    layers[0].to(device)
    try:
        with _OnDevice(model, layers_name, device), _Recorder(layers) as rec:
            for row in tqdm(calibration, desc="capturing inputs", disable=not progress, leave=False):
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
    finally:
        layers[0].to(layer0_home)
    for per_layer in rec.calls:
        for call in per_layer:
            for key in ("past_key_values", "past_key_value", "layer_past"):
                if key in call.kwargs:
                    call.kwargs[key] = None
    return rec.inputs, rec.calls


def prunable_linears(layer: nn.Module, prefix: str, skip: Callable[[str], bool]) -> dict[str, nn.Module]:
    """The linears of one decoder layer (names relative to it) whose full name ``prefix.name`` is not skipped."""
    return {n: m for n, m in find_linears(layer).items() if not skip(f"{prefix}.{n}")}


def _run_collecting(layer, linears, hidden, calls, want_hessian: bool, keep_outputs: bool, want_mean: bool = False):
    """Run every window through ``layer`` with hooks summing each linear's input statistics."""
    stats = {n: InputStats() for n in linears}
    collector = _StatsCollector(stats, want_hessian, want_mean)
    hooks = [m.register_forward_hook(collector.hook(n)) for n, m in linears.items()]
    outputs = []
    try:
        for h, call in zip(hidden, calls, strict=True):
            out = _output(call(layer, h))
            collector.next_window()
            if keep_outputs:
                outputs.append(out)
    finally:
        for hook in hooks:
            hook.remove()
    return stats, outputs


@torch.no_grad()
def dense_walk(
    model: nn.Module,
    calibration: torch.Tensor,
    device: torch.device,
    per_layer: Callable[[int, dict[str, nn.Module], dict[str, InputStats]], object],
    *,
    skip: Callable[[str], bool] = lambda name: False,
    progress: bool = True,
) -> list:
    """One pass through the dense model: ``per_layer(index, linears, stats)`` for each decoder layer.

    Statistics come from the dense model's own activations (nothing is pruned), e.g. for OWL's outlier ratios.
    """
    layers_name, layers = find_layers(model)
    hidden, calls = capture(model, calibration, device, progress)
    results = []
    for index in tqdm(range(len(layers)), desc="dense statistics", disable=not progress):
        layer = layers[index]
        home = next(layer.parameters()).device
        layer.to(device)
        linears = prunable_linears(layer, f"{layers_name}.{index}", skip)
        stats, hidden = _run_collecting(layer, linears, hidden, calls[index], False, keep_outputs=True)
        calls[index] = None
        results.append(per_layer(index, linears, stats))
        layer.to(home)
    return results


@torch.no_grad()
def walk(
    model: nn.Module,
    method: str,
    layer_sparsity: list[float],
    nm: NM | list[NM] | None,
    calibration: torch.Tensor | None,
    device: torch.device,
    *,
    skip: Callable[[str], bool] = lambda name: False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    track_error: bool = True,
    refine: DSnoTOptions | None = None,
    progress: bool = True,
) -> list[LayerResult]:
    """Prune every decoder layer in order.

    ``layer_sparsity[i]`` is layer i's unstructured target; with N:M, ``nm`` is one pattern for every layer or
    one per layer (then the sparsities are ignored). ``refine`` applies DSnoT to each selected linear's mask.
    """
    layers_name, layers = find_layers(model)
    layer_nm = nm if isinstance(nm, list) else [nm] * len(layers)
    if len(layer_sparsity) != len(layers) or len(layer_nm) != len(layers):
        raise ValueError(f"{len(layer_sparsity)} layer sparsities, {len(layer_nm)} patterns for {len(layers)} layers")
    needs_data = method != "magnitude" or refine is not None
    if needs_data:
        hidden, calls = capture(model, calibration, device, progress)
    results = []
    bar = tqdm(range(len(layers)), desc=f"{method} pruning layers", disable=not progress)
    for index in bar:
        start = time.perf_counter()
        layer = layers[index]
        home = next(layer.parameters()).device
        layer.to(device)
        linears = prunable_linears(layer, f"{layers_name}.{index}", skip)
        stats: dict[str, InputStats] = {}
        dense_out = []
        if needs_data:
            stats, dense_out = _run_collecting(
                layer, linears, hidden, calls[index], method == "sparsegpt", track_error, want_mean=refine is not None
            )
        linear_results = []
        nm = layer_nm[index]
        for name, module in linears.items():
            full = f"{layers_name}.{index}.{name}"
            refining = refine is not None and refine.applies(full)
            W = weight_view(module)
            W_dense = W.detach().clone() if refining else None
            linear_stats = stats.pop(name, None)
            mask, info = prune_linear(module, method, layer_sparsity[index], nm, linear_stats, blocksize, percdamp)
            if refining:
                mask, info["dsnot"] = _refine(W, W_dense, mask, linear_stats, nm, refine)
            linear_results.append(
                LinearResult(
                    name=full,
                    shape=tuple(W.shape),
                    sparsity_target=nm.sparsity if nm else layer_sparsity[index],
                    pruned=int(mask.sum().item()),
                    zeros=int((W == 0).sum().item()),
                    numel=W.numel(),
                    info=info,
                )
            )
        error = None
        if needs_data:
            num = den = 0.0
            for j, call in enumerate(calls[index]):
                out = _output(call(layer, hidden[j]))
                if track_error:
                    ref = dense_out[j].float()
                    num += (out.float() - ref).pow(2).sum().item()
                    den += ref.pow(2).sum().item()
                hidden[j] = out
            calls[index] = None
            error = num / den if track_error and den > 0 else None
        layer.to(home)
        del dense_out, stats
        results.append(
            LayerResult(
                index,
                f"{layers_name}.{index}",
                nm.sparsity if nm else layer_sparsity[index],
                error,
                time.perf_counter() - start,
                linear_results,
            )
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
