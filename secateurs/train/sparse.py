"""``SparseTraining``: keep any ``nn.Module`` sparse while it trains, in the optimizer idiom.

    sparse = SparseTraining(model, optimizer, method=RigL(), sparsity=0.9, distribution="erk", total_steps=N)
    for batch in loader:
        loss = ...; loss.backward()
        optimizer.step(); sparse.step()

How masks live with the model: each sparse layer gets a non-persistent bool buffer ``sparse_keep`` (one byte per
unit: per weight, or per kernel), so it follows ``model.to(device)``. A step pre-hook on the optimizer zeroes the
gradients of inactive weights before every optimizer step, and resets the optimizer state (momentum, Adam
moments) of every weight whose mask changes, so neither gradients nor optimizer state bring a pruned weight back;
``step()`` re-applies the masks to the weights after every step as a guard. SR-STE instead trains the dense
weight through a ``torch.nn.utils.parametrize`` parametrization that applies its N:M mask at every forward.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from secateurs.errors import SecateursError
from secateurs.oneshot.select import NM, check_sparsity, parse_nm
from secateurs.train import masks as M
from secateurs.train.method import Layer, Method
from secateurs.train.methods.srste import NMParametrization
from secateurs.train.registry import method_from

log = logging.getLogger("secateurs")


def _conv1d_type() -> tuple:
    """GPT-2's Conv1D (a Linear that keeps its weight as [in, out]), when transformers is there."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return ()
    return (Conv1D,)


CONV1D = _conv1d_type()
SPARSE_TYPES = (nn.Linear, nn.modules.conv._ConvNd, *CONV1D)
DISTRIBUTIONS = ("uniform", "erk")
STATE_VERSION = 1


def find_targets(
    model: nn.Module, targets: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> dict[str, nn.Module]:
    """The Linear and Conv modules of ``model`` whose names match a glob of ``targets`` and none of ``exclude``.

    Every glob of ``targets`` must match at least one such module (a typo is an error, not a dense run).
    """
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(exclude, str):
        exclude = [exclude]
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, SPARSE_TYPES) and name}
    if not candidates:
        raise SecateursError(f"{type(model).__name__} has no Linear or Conv module to make sparse")
    for glob in targets:
        if not any(fnmatch.fnmatchcase(name, glob) for name in candidates):
            shown = ", ".join(list(candidates)[:8]) + (", ..." if len(candidates) > 8 else "")
            raise SecateursError(f"target {glob!r} matches no Linear or Conv module (they are: {shown})")
    chosen = {
        name: m
        for name, m in candidates.items()
        if any(fnmatch.fnmatchcase(name, g) for g in targets) and not any(fnmatch.fnmatchcase(name, g) for g in exclude)
    }
    if not chosen:
        raise SecateursError(f"every target is excluded by {list(exclude)}: nothing left to make sparse")
    return chosen


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: str | Mapping[str, float],
    erk_power: float = 1.0,
) -> dict[str, float]:
    """One density per layer: the same everywhere (uniform), Erdős–Rényi-Kernel, or a given sparsity per layer."""
    if isinstance(distribution, Mapping):
        unknown = sorted(set(distribution) - set(shapes))
        if unknown:
            raise SecateursError(f"distribution names layers that are not targets: {', '.join(unknown)}")
        missing = sorted(set(shapes) - set(distribution))
        if missing:
            raise SecateursError(f"distribution gives no sparsity for: {', '.join(missing)}")
        return {name: 1.0 - check_sparsity(distribution[name]) for name in shapes}
    if distribution == "uniform":
        return M.uniform_densities(shapes, 1.0 - sparsity)
    if distribution == "erk":
        return (
            M.erk_densities(shapes, 1.0 - sparsity, power=erk_power)
            if sparsity > 0
            else M.uniform_densities(shapes, 1.0)
        )
    raise SecateursError(f"unknown distribution {distribution!r}: choose uniform, erk, or a dict of layer -> sparsity")


class SparseTraining:
    """Sparse training of ``model`` with ``optimizer``: masks applied, updated on the method's schedule, resumable.

    ``method``: a method config (``Static()``, ``RigL(...)``, ...), its name, or ``{"name": ..., **settings}``.
    ``sparsity``: the fraction of zeros over the target weights (parameter-weighted; per layer by ``distribution``:
    ``"erk"``, ``"uniform"`` or {layer: sparsity}). ``pattern="2:4"`` asks for N:M instead (Static, SR-STE).
    ``targets`` / ``exclude``: globs over module names (``["*"]``: every Linear and Conv). ``total_steps``: the
    optimizer steps the run will take (the schedules of GMP, SET and RigL are fractions of it).
    ``masks``: start from given masks ({module name: bool tensor of the weight's shape, True = pruned}, as
    :func:`secateurs.load_masks` returns), e.g. to fine-tune a pruned model without losing its sparsity.
    ``hook_optimizer=False`` leaves the gradients to :meth:`mask_gradients`, called before each optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        method: Method | str | dict | None = None,
        *,
        sparsity: float = 0.9,
        distribution: str | Mapping[str, float] = "erk",
        targets: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        pattern: str | NM | None = None,
        total_steps: int | None = None,
        seed: int = 0,
        masks: Mapping[str, torch.Tensor] | None = None,
        erk_power: float = 1.0,
        hook_optimizer: bool = True,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.method = method_from(method)
        self.nm = parse_nm(pattern) if isinstance(pattern, str) else pattern
        self.sparsity = self.nm.sparsity if self.nm is not None else check_sparsity(sparsity)
        if self.nm is not None and not self.method.supports_pattern:
            raise SecateursError(f"{self.method.name} does not train N:M patterns: use srste or static with pattern=")
        if self.method.straight_through and self.nm is None:
            raise SecateursError(f"{self.method.name} needs an N:M pattern, e.g. pattern='2:4'")
        if self.method.needs_total_steps and (not isinstance(total_steps, int) or total_steps < 1):
            raise SecateursError(
                f"{self.method.name} needs total_steps (the number of optimizer steps the run will take), "
                f"got {total_steps!r}"
            )
        self.total_steps = total_steps
        self.step_count = 0
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.layers = find_targets(model, targets, exclude)
        self.targets, self.exclude = list(targets), list(exclude)
        self.history: list[dict] = []
        self._grow: dict[str, torch.Tensor] = {}
        self._hook = None
        self._pending = False
        if masks is not None:
            self._check_given_masks(masks)
            if self.method.unit != "weight" or self.method.straight_through:
                raise SecateursError(f"masks= needs a method that keeps single weights, not {self.method.name}")
        if self.nm is not None:
            for name, module in self.layers.items():
                if isinstance(module, CONV1D):
                    raise SecateursError(
                        f"N:M patterns run along a weight's inputs, which GPT-2's Conv1D keeps as its first axis: "
                        f"{name} (leave it out with exclude=)"
                    )
                if module.weight.dim() < 2 or module.weight.shape[1] % self.nm.m:
                    raise SecateursError(
                        f"N:M pattern {self.nm} needs input widths divisible by {self.nm.m}: {name} has "
                        f"{module.weight.shape[1]} (leave it out with exclude=)"
                    )
        shapes = {name: tuple(m.weight.shape) for name, m in self.layers.items()}
        if masks is not None:
            self.densities = {n: 1.0 - float(masks[n].float().mean()) for n in self.layers}
        elif self.nm is not None:
            self.densities = dict.fromkeys(self.layers, 1.0 - self.nm.sparsity)
        else:
            self.densities = layer_densities(shapes, self.sparsity, distribution, erk_power)
        self.distribution = distribution if isinstance(distribution, str) else "table"
        if self.method.straight_through:
            for module in self.layers.values():
                parametrize.register_parametrization(module, "weight", NMParametrization(self.nm, self.method.decay))
            return
        for name, module in self.layers.items():
            if masks is not None:
                keep = ~masks[name].to(torch.bool).cpu()
                keep = keep.reshape(M.unit_shape(keep.shape, "weight"))
            else:
                keep = self.method.initial_keep(module.weight, self.densities[name], self.nm, self.generator)
            module.register_buffer("sparse_keep", keep.to(module.weight.device), persistent=False)
        self.apply_masks()
        if optimizer is not None and hook_optimizer:
            self._hook = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.mask_gradients())

    # ---- the loop
    def _update_due(self) -> bool:
        return self._pending or self.method.due(self.step_count + 1, self.total_steps)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of inactive weights (and, before a gradient-driven update, record |gradient|)."""
        if self.method.straight_through:
            return
        record = self.method.grows_by_gradient and self._update_due()
        for name, module in self.layers.items():
            grad = module.weight.grad
            if grad is None:
                continue
            if record:
                self._grow[name] = M.unit_scores(grad, self.method.unit)
            grad.mul_(module.sparse_keep)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set every inactive weight to zero."""
        if self.method.straight_through:
            return
        for module in self.layers.values():
            module.weight.mul_(module.sparse_keep)

    @torch.no_grad()
    def step(self) -> dict | None:
        """Call after ``optimizer.step()``: counts the step, updates the masks when due; returns the update's record."""
        self.step_count += 1
        if self.method.straight_through:
            return None
        record = None
        if self._pending or self.method.due(self.step_count, self.total_steps):
            if self.method.grows_by_gradient and len(self._grow) < len(self.layers):
                # no gradient reached the optimizer (a skipped step, e.g. an inf under GradScaler): try next step
                log.warning("step %d: no gradient recorded, mask update postponed", self.step_count)
                self._pending = True
            else:
                self._pending = False
                record = self._update()
        self._grow.clear()
        self.apply_masks()
        return record

    def _update(self) -> dict:
        changed = {}
        for name, module in self.layers.items():
            keep = module.sparse_keep
            layer = Layer(name, module.weight.data, keep, self.densities[name], self.method.unit, self._grow.get(name))
            out = self.method.update(layer, self.step_count, self.total_steps, self.generator)
            if out.grown.any():
                module.weight.data.mul_(~out.grown)
            active = int(keep.sum())
            keep.copy_(out.keep)
            self._reset_state(module.weight, out.keep & ~out.grown)
            changed[name] = {
                "dropped": int(out.dropped.sum()),
                "grown": int(out.grown.sum()),
                "active": int(out.keep.sum()),
                "churn": int(out.dropped.sum()) / max(active, 1),
            }
        record = {"step": self.step_count, "layers": changed}
        self.history.append(record)
        return record

    def _reset_state(self, param: torch.Tensor, survivors: torch.Tensor) -> None:
        """Zero the optimizer state of ``param`` wherever a weight is not a surviving active one."""
        if self.optimizer is None:
            return
        state = self.optimizer.state.get(param, {})
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.mul_(survivors.to(value.device))

    # ---- what it did
    def keep_masks(self) -> dict[str, torch.Tensor]:
        """{layer: bool tensor of the weight's shape, True = active}."""
        out = {}
        for name, module in self.layers.items():
            if self.method.straight_through:
                out[name] = M.nm_keep(module.parametrizations.weight.original, self.nm)
            else:
                out[name] = module.sparse_keep.expand_as(module.weight).clone()
        return out

    def pruned_masks(self) -> dict[str, torch.Tensor]:
        """{layer: bool tensor of the weight's shape, True = pruned}: the convention of ``masks.safetensors``."""
        return {name: ~keep for name, keep in self.keep_masks().items()}

    @torch.no_grad()
    def sparsity_by_layer(self) -> dict[str, float]:
        """The fraction of zeros in each target weight, counted from the weights the forward uses."""
        return {name: float((m.weight == 0).float().mean()) for name, m in self.layers.items()}

    @torch.no_grad()
    def overall_sparsity(self) -> float:
        """Zeros over all target weights (parameter-weighted)."""
        zeros = sum(int((m.weight == 0).sum()) for m in self.layers.values())
        return zeros / max(sum(m.weight.numel() for m in self.layers.values()), 1)

    def mask_bytes(self) -> int:
        """Memory the masks take (one byte per unit; SR-STE keeps none between steps)."""
        if self.method.straight_through:
            return 0
        return sum(m.sparse_keep.numel() for m in self.layers.values())

    # ---- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume: step, method, densities, masks, the random generator and the history."""
        return {
            "version": STATE_VERSION,
            "step": self.step_count,
            "method": {"name": self.method.name, **self.method.options()},
            "pattern": str(self.nm) if self.nm else None,
            "total_steps": self.total_steps,
            "densities": dict(self.densities),
            "shapes": {name: list(m.weight.shape) for name, m in self.layers.items()},
            "masks": {}
            if self.method.straight_through
            else {n: m.sparse_keep.cpu().clone() for n, m in self.layers.items()},
            "generator": self.generator.get_state(),
            "pending": self._pending,
            "history": list(self.history),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict` (of a run of the same model and method; anything else is an error)."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise SecateursError("not a sparse-training state (or from another version of secateurs)")
        shapes = {name: list(m.weight.shape) for name, m in self.layers.items()}
        if state.get("shapes") != shapes:
            theirs = state.get("shapes") or {}
            diff = sorted(set(theirs) ^ set(shapes)) or [n for n in shapes if theirs.get(n) != shapes[n]]
            raise SecateursError(f"sparse-training state is from another model: layers differ at {', '.join(diff[:4])}")
        if state["method"].get("name") != self.method.name:
            raise SecateursError(
                f"sparse-training state is from method {state['method'].get('name')}, not {self.method.name}"
            )
        self.step_count = int(state["step"])
        self.densities = {n: float(d) for n, d in state["densities"].items()}
        self.generator.set_state(state["generator"])
        self.history = list(state.get("history", []))
        self._pending = bool(state.get("pending", False))
        for name, keep in state["masks"].items():
            self.layers[name].sparse_keep.copy_(keep.to(torch.bool))
        self.apply_masks()

    # ---- the end
    @torch.no_grad()
    def finalize(self) -> nn.Module:
        """Bake the masks into the weights and remove buffers, hooks and parametrizations: a plain sparse model."""
        for module in self.layers.values():
            if self.method.straight_through:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            else:
                module.weight.mul_(module.sparse_keep)
                del module.sparse_keep
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return self.model

    def summary(self) -> dict:
        """Targets, densities and the measured sparsity, for reports."""
        return {
            "method": {"name": self.method.name, **self.method.options()},
            "pattern": str(self.nm) if self.nm else None,
            "sparsity": self.sparsity,
            "distribution": self.distribution,
            "layers": {
                n: {"shape": list(m.weight.shape), "density": self.densities[n]} for n, m in self.layers.items()
            },
            "measured_sparsity": self.overall_sparsity(),
            "mask_bytes": self.mask_bytes(),
            "steps": self.step_count,
            "updates": len(self.history),
        }

    def _check_given_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        missing = [n for n in self.layers if n not in masks]
        if missing:
            raise SecateursError(f"masks give no mask for target(s) {', '.join(missing[:4])}")
        for name, module in self.layers.items():
            if tuple(masks[name].shape) != tuple(module.weight.shape):
                raise SecateursError(
                    f"mask for {name} has shape {tuple(masks[name].shape)}, the weight {tuple(module.weight.shape)}"
                )
