"""Activation sparsity at decode: inputs of small magnitude skipped, together with the pruned weights.

Each linear's input ``x`` is thresholded, ``x' = x · [|x| > τ]``, with one threshold ``τ`` per linear chosen on
calibration text so that a target fraction of its inputs falls at or below it (the per-tensor magnitude
thresholds of TEAL, arXiv 2408.14690; CATS, arXiv 2404.08763, and CHESS, arXiv 2409.01366, threshold the MLP's
gate activation or choose per channel). On the CPU kernel the thresholded linears hold their weight in the column
layout (:func:`secateurs.runtime.kernels.to_layout`), so a skipped input's column of weights is never read: with
weight sparsity ``s`` and activation sparsity ``a`` a decode step reads about ``(1 - a)`` of the packed bytes.

How this differs from the references, and why:

- **Every token is thresholded**, the prompt's too, so the perplexity measured is that of exactly the model that
  decodes. TEAL keeps the prompt dense when it generates.
- **The thresholds come from one pass of the calibration text** through the model as it is (pruned, not yet
  thresholded), as TEAL's do. The target is the fraction of a linear's inputs at or below its threshold on that
  text; on other text the fraction moves, and :func:`sparsify_activations` reports what it measured.
- **Linears that share an input** (q/k/v, gate/up) get the same threshold, since they see the same values.
- **The LM head is never thresholded.**

:func:`sparsify_activations` switches it on for a model in place: on the kernel (CPU) or as plain forward hooks
(any device; the pure-torch statement of the same model).
"""

from __future__ import annotations

import fnmatch
import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.data.calibration import Calibration
from secateurs.errors import SecateursError
from secateurs.models import PRUNABLE, position_limit, weight_view
from secateurs.runtime import kernels
from secateurs.runtime.modules import SparseLinear, replace_module

log = logging.getLogger(__name__)

# The calibration text for the thresholds when none is given: a few windows suffice for a per-linear quantile.
DEFAULT_CALIBRATION = Calibration(source="shakespeare", nsamples=8, seqlen=256, seed=0)
SAMPLES_PER_CALL = 16384  # |x| values kept per linear and forward call (a seeded random subset)


def activation_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linears whose inputs may be thresholded: every nn.Linear, Conv1D or SparseLinear except the LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (*PRUNABLE, SparseLinear)) and m is not head and name
    }


def _check_fraction(value, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SecateursError(f"{what} must be a number in [0, 1), got {value!r}") from None
    if not 0 <= value < 1:
        raise SecateursError(f"{what} must be in [0, 1), got {value}")
    return value


def check_sparsity(sparsity) -> None:
    """Raise a one-line error unless ``sparsity`` is a fraction in [0, 1) or a dict of pattern to such fractions."""
    if isinstance(sparsity, dict):
        if not sparsity:
            raise SecateursError("activation sparsity: the dict of patterns is empty")
        for k, v in sparsity.items():
            _check_fraction(v, f"activation sparsity for {k!r}")
    else:
        _check_fraction(sparsity, "activation sparsity")


def targets(names, sparsity) -> dict[str, float]:
    """Target activation sparsity per linear name: ``sparsity`` a number (every linear) or a dict of glob pattern
    to number (the first pattern that matches a name; names no pattern matches are left dense)."""
    if isinstance(sparsity, dict):
        checked = {str(k): _check_fraction(v, f"activation sparsity for {k!r}") for k, v in sparsity.items()}
        out = {}
        for name in names:
            for pattern, value in checked.items():
                if fnmatch.fnmatchcase(name, pattern):
                    out[name] = value
                    break
        unused = [p for p in checked if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unused:
            raise SecateursError(f"activation sparsity pattern {unused[0]!r} matches no linear of the model")
        return out
    value = _check_fraction(sparsity, "activation sparsity")
    return {name: value for name in names}


@torch.no_grad()
def calibrate_thresholds(
    model: nn.Module,
    windows: torch.Tensor,
    wanted: dict[str, float],
    samples: int = SAMPLES_PER_CALL,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """For each linear of ``wanted`` (name -> target fraction), the magnitude threshold ``τ`` at or below which that
    fraction of its inputs falls on the token ``windows`` [n, seqlen]: the ``⌈target · N⌉``-th smallest of ``N``
    sampled input magnitudes (``samples`` drawn per forward call with a seeded generator, all when fewer)."""
    modules = dict(model.named_modules())
    live = {name: t for name, t in wanted.items() if t > 0}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in live}
    generator = torch.Generator().manual_seed(seed)
    # one sample per input tensor, so linears that share an input share its sample (and threshold); the input is
    # held until the window is done, so its address cannot be reused by another tensor meanwhile
    shared: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def record(module, args):
            key = (args[0].data_ptr(), tuple(args[0].shape), args[0].dtype)
            if key not in shared:
                x = args[0].detach().abs().reshape(-1).float().cpu()
                if x.numel() > samples:
                    x = x[torch.randint(0, x.numel(), (samples,), generator=generator)]
                shared[key] = (args[0], x)
            seen[name].append(shared[key][1])

        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in live]
    device = next(model.parameters()).device
    try:
        for row in tqdm(windows, desc="activation thresholds", disable=not progress, leave=False):
            shared.clear()
            model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    thresholds = {}
    for name, target in live.items():
        values = torch.cat(seen[name]).sort().values
        k = max(1, int(round(target * values.numel())))
        thresholds[name] = float(values[k - 1])
    return thresholds


def _on_kernel(module: nn.Module) -> bool:
    if isinstance(module, SparseLinear):
        return True
    W = weight_view(module)
    return W.device.type == "cpu" and W.dtype in kernels.DTYPES


def sparsify_activations(
    model: nn.Module,
    sparsity,
    tokenizer=None,
    *,
    calibration: Calibration | None = None,
    windows: torch.Tensor | None = None,
    kernel: bool | None = None,
    progress: bool = False,
) -> dict:
    """Threshold the inputs of the model's linears (not the LM head), in place; returns a summary.

    ``sparsity``: the target fraction of each linear's inputs to skip, or a dict of glob pattern to fraction (see
    :func:`targets`). The thresholds are calibrated on ``windows`` (token ids [n, seqlen]) or on ``calibration``'s
    windows (default :data:`DEFAULT_CALIBRATION`, which needs ``tokenizer``).

    ``kernel=True`` puts every thresholded linear on the sparse kernel in the column layout (a dense one is packed
    too: a full mask, 1/8 byte a weight more), so decode never reads a skipped input's weights; the model must be
    on the CPU in float32 or bfloat16. ``kernel=False`` thresholds with forward pre-hooks in plain torch (any device,
    no speed gained: the definition, for evaluation). ``None``: the kernel when every linear can go on it.
    """
    linears = activation_linears(model)
    if not linears:
        raise SecateursError("the model has no linear layers to threshold")
    if getattr(model, "_secateurs_activation_sparsity", None) is not None:
        raise SecateursError("the model's activations are already thresholded: load it afresh to choose again")
    wanted = targets(list(linears), sparsity)
    if windows is None:
        if tokenizer is None:
            raise SecateursError("calibrating activation thresholds needs a tokenizer or token windows")
        if calibration is None:  # the default, no longer than the model's positions
            limit = position_limit(model)
            seqlen = DEFAULT_CALIBRATION.seqlen if limit is None else min(DEFAULT_CALIBRATION.seqlen, limit)
            calibration = Calibration(DEFAULT_CALIBRATION.source, DEFAULT_CALIBRATION.nsamples, seqlen)
        windows = calibration.windows(tokenizer)
        c = calibration
        protocol = f"{c.nsamples} x {c.seqlen} tokens of {c.source}, seed {c.seed}"
    else:
        protocol = f"{windows.shape[0]} x {windows.shape[1]} given tokens"
    if kernel is None:
        kernel = all(_on_kernel(linears[name]) for name, t in wanted.items() if t > 0)
    elif kernel:
        refused = [name for name, t in wanted.items() if t > 0 and not _on_kernel(linears[name])]
        if refused:
            raise SecateursError(
                f"{refused[0]} cannot run on the CPU kernel (it needs float32 or bfloat16 weights on the CPU)"
            )
    thresholds = calibrate_thresholds(model, windows, wanted, progress=progress)
    measured = _measured(model, windows[:1], thresholds)
    for name, tau in thresholds.items():
        module = linears[name]
        if kernel:
            if isinstance(module, SparseLinear):
                if module.shared is not None:  # thresholded linears run on their own, in the column layout
                    module.shared[0].release()
                module.packed = kernels.to_layout(module.packed, "columns")
            else:
                module = SparseLinear.from_dense(module, layout="columns")
                replace_module(model, name, module)
            module.threshold = tau
        else:
            module.register_forward_pre_hook(_threshold_hook(tau))
    model._secateurs_activation_sparsity = sparsity
    summary = {
        "target": sparsity,
        "linears": len(thresholds),
        "kernel": bool(kernel),
        "calibration": protocol,
        "measured_on_first_window": measured,
        "thresholds": thresholds,
    }
    log.info(
        "activation sparsity on %d linears (%s): %.1f%% of their inputs skipped on the first calibration window",
        len(thresholds),
        "sparse kernel, column layout" if kernel else "torch hooks",
        100 * measured,
    )
    return summary


def _threshold_hook(tau: float):
    def hook(module, args):
        return (kernels.threshold_inputs(args[0], tau), *args[1:])

    return hook


@torch.no_grad()
def _measured(model: nn.Module, windows: torch.Tensor, thresholds: dict[str, float]) -> float:
    """The fraction of thresholded linears' inputs at or below their thresholds on ``windows`` (the model as it is)."""
    modules = dict(model.named_modules())
    counts = [0, 0]

    def hook(tau):
        def count(module, args):
            x = args[0]
            counts[0] += int((x.abs() <= tau).sum())
            counts[1] += x.numel()

        return count

    handles = [modules[name].register_forward_pre_hook(hook(tau)) for name, tau in thresholds.items()]
    device = next(model.parameters()).device
    try:
        for row in windows:
            model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return counts[0] / max(counts[1], 1)
