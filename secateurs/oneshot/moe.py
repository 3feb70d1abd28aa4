"""Mixture-of-experts decoder layers: every expert pruned as its own linears, on the tokens routed to it.

transformers keeps the experts of an MoE block (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE, DeepSeek, GPT-OSS ...) in one
module holding 3-D parameters, ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], that no nn.Linear search
sees. What is recognised, structurally (no model family is named anywhere):

* **fused experts**: a module with an integer ``num_experts`` and a 3-D parameter whose first dimension is that
  number. Its layout must be declared the way transformers' experts interface declares it (the ``has_gate``,
  ``is_transposed``, ``is_concatenated``, ``has_bias`` flags set by ``@use_experts_implementation``), with
  ``gate_up_proj`` (or ``up_proj`` without a gate), ``down_proj`` and their ``*_bias``. Anything else raises a
  :class:`SecateursError` naming the module: its experts are never skipped silently.
* **experts as linears**: expert ``e`` becomes ``experts.{e}.gate_proj``, ``experts.{e}.up_proj`` and
  ``experts.{e}.down_proj`` (:class:`ExpertLinear`), whose weight [out, in] is a view of the fused parameter, so
  pruning it prunes the fused parameter in place. The fused gate/up matrix is split into its two halves: they are
  two matrices of the maths (the gate goes through the activation, the up projection does not), they are two
  ``nn.Linear`` in the dense MLP of the same models and in per-expert checkpoints (``experts.5.gate_proj``), and
  a per-matrix pruner (magnitude's one threshold, SparseGPT's blocks) then treats a fused expert exactly as the
  same weights stored unfused. Both halves read the same input, so they share one set of statistics.
* **routing**: while the walk runs (:func:`experts_as_linears`), the experts module's forward is a loop over
  experts that calls those linears on the tokens the router sent to each (the per-expert form of transformers'
  own eager forward), so the statistics hooks of expert ``e`` see exactly its tokens. The first call of each
  module is checked against the module's own forward, so a model whose experts compute something else stops
  with an error instead of being pruned on wrong statistics.
* **routers stay dense**: a linear of the MoE block outside the experts with one output per expert or a single one
  (a router, a shared expert's scalar gate) is not pruned; transformers' own routers are not ``nn.Linear`` and
  were never found. A router is a tiny share of the weights (E x H against 3 x E x I x H for the experts), and
  every token's choice of experts goes through it: pruning it would change which experts see which tokens, the
  very assignment the experts' statistics were collected under. MoE pruning work keeps it dense for that reason.
* **unrouted experts**: an expert no calibration token was routed to has no statistics to prune it by; the
  recipe's ``unrouted_experts`` decides: ``"dense"`` (the default) leaves it whole, ``"magnitude"`` prunes it by
  magnitude to the layer's target. Either way its result says ``{"unrouted": True, "policy": ...}``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.models import PRUNABLE, find_layers, weight_view
from secateurs.oneshot.pruners.magnitude import magnitude_mask
from secateurs.oneshot.stage import Target

log = logging.getLogger(__name__)

UNROUTED = ("dense", "magnitude")  # what becomes of an expert no calibration token was routed to
LAYOUT_FLAGS = ("has_gate", "is_transposed", "is_concatenated", "has_bias")


@dataclass(frozen=True)
class Layout:
    """How a fused experts module stores its experts (the flags of transformers' experts interface)."""

    num_experts: int
    has_gate: bool  # gate_up_proj (gate and up projections together) rather than up_proj alone
    transposed: bool  # parameters [E, in, out] rather than [E, out, in]
    concatenated: bool  # gate_up rows [gate; up] rather than interleaved [g0, u0, g1, u1 ...]
    bias: bool
    post_norm: bool  # post_expert_norm applied to each expert's output

    @property
    def first(self) -> str:
        return "gate_up_proj" if self.has_gate else "up_proj"


def fused_layout(module: nn.Module) -> Layout | None:
    """The layout of ``module`` if it holds fused experts, None if it does not; an error for fused experts whose
    layout is not the one described in this module's docstring."""
    E = getattr(module, "num_experts", None)
    if not isinstance(E, int) or isinstance(E, bool) or isinstance(module, PRUNABLE):
        return None
    fused = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == E}
    if not fused:
        return None
    where = f"{type(module).__name__} (3-D parameters {', '.join(f'{n} {list(s)}' for n, s in fused.items())})"
    if not all(isinstance(getattr(module, flag, None), bool) for flag in LAYOUT_FLAGS):
        raise SecateursError(
            f"cannot prune the {E} experts of {where}: the module does not declare its layout the way transformers' "
            f"experts interface does ({', '.join(LAYOUT_FLAGS)})"
        )
    layout = Layout(
        E,
        module.has_gate,
        module.is_transposed,
        module.is_concatenated,
        module.has_bias,
        bool(getattr(module, "has_post_expert_norm", False)),
    )
    if getattr(module, "_is_expert_parallel", False):
        raise SecateursError(f"cannot prune the experts of {where}: they are sharded over processes (expert parallel)")
    if set(fused) != {layout.first, "down_proj"}:
        raise SecateursError(f"cannot prune the experts of {where}: expected {layout.first} and down_proj")
    first, down = (_out_in(fused[n], layout.transposed) for n in (layout.first, "down_proj"))
    inner = down[1]
    if first[1] != down[0] or first[0] != inner * (2 if layout.has_gate else 1):
        raise SecateursError(f"cannot prune the experts of {where}: their shapes do not chain")
    return layout


def _out_in(shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    return (shape[2], shape[1]) if transposed else (shape[1], shape[2])


class ExpertLinear(nn.Linear):
    """One expert's projection as a linear: weight [out, in] and bias are views of the fused parameters, taken on
    every access (so they follow the parameters through ``.to()`` or a streamed reload), and it owns no tensor
    (so it never appears in a state dict). ``part``: 0 the gate half, 1 the up half of ``gate_up_proj``."""

    def __init__(self, owner: nn.Module, param: str, index: int, part: int | None, layout: Layout):
        nn.Module.__init__(self)
        self.__dict__["_source"] = (owner, param, index, part, layout)  # plain attribute: not a submodule
        self.out_features, self.in_features = self.weight.shape

    def _view(self, suffix: str) -> torch.Tensor | None:
        owner, param, index, part, layout = self._source
        tensor = getattr(owner, param + suffix, None)
        if tensor is None:
            return None
        t = tensor[index]
        if suffix == "" and layout.transposed:
            t = t.t()
        if part is None:
            return t
        if layout.concatenated:
            half = t.shape[0] // 2
            return t[half:] if part else t[:half]
        return t[part::2]

    @property
    def weight(self) -> torch.Tensor:
        return self._view("")

    @property
    def bias(self) -> torch.Tensor | None:
        return self._view("_bias") if self._source[4].bias else None


class Expert(nn.Module):
    """Expert ``index`` of a fused experts module as separate linears, computing what the module computes for it:
    gate and up projections, the module's own gating (``_apply_gate``, or its activation without a gate), down
    projection, and the module's post-expert norm if it has one."""

    def __init__(self, owner: nn.Module, index: int, layout: Layout):
        super().__init__()
        self.__dict__["_owner"], self.__dict__["_layout"] = owner, layout
        if layout.has_gate:
            self.gate_proj = ExpertLinear(owner, "gate_up_proj", index, 0, layout)
            self.up_proj = ExpertLinear(owner, "gate_up_proj", index, 1, layout)
        else:
            self.up_proj = ExpertLinear(owner, "up_proj", index, None, layout)
        self.down_proj = ExpertLinear(owner, "down_proj", index, None, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner, layout = self._owner, self._layout
        if layout.has_gate:
            gate, up = self.gate_proj(x), self.up_proj(x)
            both = torch.cat([gate, up], -1) if layout.concatenated else torch.stack([gate, up], -1).flatten(-2)
            h = owner._apply_gate(both)
        else:
            h = owner.act_fn(self.up_proj(x))
        y = self.down_proj(h)
        return owner.post_expert_norm(y) if layout.post_norm else y


def _expert_modules(owner: nn.Module, layout: Layout) -> list[Expert]:
    return [Expert(owner, e, layout) for e in range(layout.num_experts)]


def _attached(module: nn.Module) -> bool:
    return isinstance(module._modules.get("0"), Expert)


def _views(experts: list[Expert]) -> dict[str, nn.Module]:
    return {f"{e}.{n}": m for e, expert in enumerate(experts) for n, m in expert.named_children()}


def _fused_modules(model: nn.Module) -> list[tuple[str, nn.Module, Layout]]:
    """(name, module, layout) of every fused experts module of ``model`` whose layout is handled here."""
    out = []
    for name, module in model.named_modules():
        try:
            layout = fused_layout(module)
        except SecateursError:  # the walk refuses these; the callers here only look names up
            continue
        if layout is not None:
            out.append((name, module, layout))
    return out


def has_experts(model: nn.Module) -> bool:
    """Whether ``model`` has mixture-of-experts blocks (fused experts, or expert linears under an ``experts``
    module): their linears see the tokens routed to them, not whole windows."""
    return bool(_fused_modules(model)) or any("experts" in name.split(".") for name, _ in model.named_modules())


def expert_linears(model: nn.Module) -> dict[str, ExpertLinear]:
    """Every expert linear of every fused experts module in ``model``, by full name (e.g.
    ``model.layers.3.mlp.experts.5.gate_proj``): the names the walk gives their masks."""
    out = {}
    for name, module, layout in _fused_modules(model):
        if not _attached(module):
            out.update({f"{name}.{k}": v for k, v in _views(_expert_modules(module, layout)).items()})
    return out


def fused_parameters(model: nn.Module) -> list[str]:
    """Full names of the 3-D expert parameters of ``model`` (``...experts.gate_up_proj``, ``...experts.down_proj``)."""
    return [f"{name}.{p}" for name, _, layout in _fused_modules(model) for p in (layout.first, "down_proj")]


def layer_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """The linears of one decoder layer that pruning may touch, by name relative to it: every nn.Linear / Conv1D
    except the routers of MoE blocks, and the :class:`ExpertLinear` of every expert of every fused experts module
    (while :func:`experts_as_linears` is active, the very modules its per-expert forward calls)."""
    modules = list(layer.named_modules())
    layouts = {name: layout for name, m in modules if (layout := fused_layout(m)) is not None}
    blocks = {name.rpartition(".")[0]: layout.num_experts for name, layout in layouts.items()}
    out: dict[str, nn.Module] = {}
    for name, module in modules:
        if name in layouts and not _attached(module):
            out.update({f"{name}.{k}": v for k, v in _views(_expert_modules(module, layouts[name])).items()})
        elif isinstance(module, PRUNABLE) and not _is_router(name, module, blocks, layouts):
            out[name] = module
    return out


def _is_router(name: str, module: nn.Module, blocks: dict[str, int], experts: dict) -> bool:
    """A linear of an MoE block, outside its experts, with one output per expert or a single one (a scalar gate)."""
    if isinstance(module, ExpertLinear) or any(name.startswith(f"{e}.") for e in experts):
        return False
    block = next((b for b in blocks if name.startswith(f"{b}.") or (b == "" and "." not in name)), None)
    return block is not None and weight_view(module).shape[0] in (1, blocks[block])


@contextmanager
def experts_as_linears(model: nn.Module) -> Iterator[None]:
    """Inside: every fused experts module of ``model`` has its experts as child modules (``experts.{e}.gate_proj``
    ...) and a forward that runs each expert's linears on the tokens routed to it. Restored on leaving; nested use
    leaves the outer one in charge."""
    found = [(m, layout) for _, m in model.named_modules() if (layout := fused_layout(m)) is not None]
    patched = []
    try:
        for module, layout in found:
            if _attached(module):
                continue
            had_forward = "forward" in module.__dict__
            saved = module.forward
            for e, expert in enumerate(_expert_modules(module, layout)):
                module.add_module(str(e), expert)
            module.forward = _routed_forward(module, saved)
            patched.append((module, layout, had_forward, saved))
        yield
    finally:
        for module, layout, had_forward, saved in patched:
            for e in range(layout.num_experts):
                del module._modules[str(e)]
            if had_forward:
                module.forward = saved
            else:
                del module.forward


def with_expert_linears(fn: Callable) -> Callable:
    """Decorator: run ``fn(model, ...)`` inside :func:`experts_as_linears` of ``model``."""

    @functools.wraps(fn)
    def wrapped(model: nn.Module, *args, **kwargs):
        with experts_as_linears(model):
            return fn(model, *args, **kwargs)

    return wrapped


def routed(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """The experts' output for tokens [T, H] routed to ``top_k_index`` [T, k] with ``top_k_weights`` [T, k]: each
    expert's linears on its own tokens, weighted and summed into place, expert by expert as the eager forward does."""
    out = torch.zeros_like(hidden_states)
    for e in range(experts.num_experts):
        slot, tokens = torch.where(top_k_index.t() == e)  # by top-k slot, then token: the eager order
        if tokens.numel() == 0:
            continue
        y = experts._modules[str(e)](hidden_states[tokens]) * top_k_weights[tokens, slot, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


def _routed_forward(experts: nn.Module, original: Callable) -> Callable:
    """The forward used during the walk; its first call also runs ``original`` and refuses a different result."""
    checked = False

    def forward(hidden_states, top_k_index, top_k_weights):
        nonlocal checked
        out = routed(experts, hidden_states, top_k_index, top_k_weights)
        if not checked:
            _check_same(out, original(hidden_states, top_k_index, top_k_weights), type(experts).__name__)
            checked = True
        return out

    return forward


def _check_same(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Refuse a per-expert restatement that does not compute what the module computes (up to rounding)."""
    if ours.numel() == 0:
        return
    tolerance = 1e-3 if ours.dtype in (torch.float32, torch.float64) else 3e-2
    scale = theirs.detach().float().abs().max().item()
    error = (ours.detach().float() - theirs.detach().float()).abs().max().item() if ours.shape == theirs.shape else None
    if error is None or error > tolerance * scale + 1e-6:
        raise SecateursError(
            f"cannot prune the experts of {what}: computed expert by expert, they do not give the module's own "
            f"output (max difference {error} for outputs up to {scale:.3g}); its forward is not the standard one"
        )


# ------------------------------------------------------------------------------------------- unrouted experts
def check_unrouted(policy: str) -> str:
    if policy not in UNROUTED:
        raise SecateursError(f"unrouted_experts must be one of {', '.join(UNROUTED)}, not {policy!r}")
    return policy


def unrouted(stats) -> bool:
    """Whether a linear's statistics were collected (the stages need data) and hold no token: an expert the router
    never chose on the calibration text."""
    return stats is not None and stats.ntokens == 0


def prune_unrouted(W: torch.Tensor, target: Target, policy: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(weight, mask True = pruned, details) of a linear without statistics: left dense, or magnitude pruning to
    ``target`` (one threshold for the matrix, or N:M), as ``policy`` says."""
    info = {"unrouted": True, "policy": check_unrouted(policy)}
    if policy == "dense":
        return W.detach().clone(), torch.zeros(W.shape, dtype=torch.bool, device=W.device), info
    mask = magnitude_mask(W, target.sparsity, target.nm)
    return W.detach().masked_fill(mask, 0), mask, info


def warn_unrouted(layers: list) -> None:
    """One warning line for the experts that got no calibration token (of the walk's layer results), if any."""
    found = [lin for layer in layers for lin in layer.linears if lin.info.get("unrouted")]
    if not found:
        return
    experts = list(dict.fromkeys(lin.name.rpartition(".")[0] for lin in found))
    policy = found[0].info["policy"]
    one = len(experts) == 1
    log.warning(
        "%d expert%s got no calibration token and %s %s (unrouted_experts=%s): %s%s",
        len(experts),
        "" if one else "s",
        "was" if one else "were",
        "left dense" if policy == "dense" else "pruned by magnitude",
        policy,
        ", ".join(experts[:4]),
        ", ..." if len(experts) > 4 else "",
    )


def snapshot_linears(model) -> dict[str, torch.Tensor]:
    """CPU copies of the weights of every linear in the decoder layers (the only tensors pruning changes), each MoE
    expert's included."""

    name, layers = find_layers(model)
    return {
        f"{name}.{i}.{n}": m.weight.detach().to("cpu", copy=True)
        for i, layer in enumerate(layers)
        for n, m in layer_linears(layer).items()
    }


@torch.no_grad()
def restore_linears(model, saved: dict[str, torch.Tensor]) -> None:
    """Put back the weights saved by :func:`snapshot_linears`."""
    experts = expert_linears(model)  # views of the fused expert parameters: not submodules
    for name, weight in saved.items():
        (experts[name] if name in experts else model.get_submodule(name)).weight.copy_(weight)
