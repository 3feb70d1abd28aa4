"""Merging fine-tuned models of one base: plain averaging, task arithmetic, TIES, and DARE in front of either.

Every method is a pure function of the base's tensors and the task vectors tau_t = theta_t - theta_0 (float32,
:func:`secateurs.merge.tensors.task_vector`), returning the merged tensors in the base's dtypes:

- **average**: theta_0 + (1/T) sum_t tau_t, the mean of the fine-tuned models;
- **task arithmetic** (Ilharco et al. 2023): theta_0 + lambda sum_t tau_t;
- **TIES** (Yadav et al. 2023): trim each tau_t to its top-k fraction of magnitudes (the rest zeroed), elect each
  entry's sign as the sign of the sum of the trimmed values (the sign with more total magnitude), average each
  entry over the tasks whose trimmed value has the elected sign (zeros take no part), theta_0 + lambda * that;
- **DARE + either** (Yu et al. 2023): each tau_t first dropped and rescaled (:mod:`secateurs.merge.delta`; task t's
  masks from the seed and t), then task arithmetic or TIES (``k=1.0``: no trim, DARE has already thinned it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from secateurs.errors import SecateursError
from secateurs.merge.delta import DARE, config_q, dare
from secateurs.merge.tensors import Tensors, add, check_match

SCOPES = ("model", "tensor")


@dataclass
class Average:
    """The mean of the fine-tuned models (task arithmetic with lambda = 1/T)."""

    name = "average"

    def to_dict(self) -> dict:
        return {"method": self.name}


@dataclass
class TaskArithmetic:
    """theta_0 + lam * sum of the task vectors; ``dare``: drop and rescale each task vector first (DARE + TA)."""

    lam: float = 1.0
    dare: DARE | None = None
    name = "task-arithmetic"

    def to_dict(self) -> dict:
        out = {"method": "dare-ta" if self.dare else self.name, "lam": self.lam}
        return {**out, "dare": self.dare.to_dict()} if self.dare else out


@dataclass
class TIES:
    """TIES-merging: keep the top ``k`` fraction of each task vector's magnitudes (over the whole model, the paper's
    choice, or per ``"tensor"``), elect signs, disjoint mean, theta_0 + ``lam`` * merged. The paper's defaults:
    k = 0.2, lam = 1. ``dare``: drop and rescale each task vector first (DARE + TIES)."""

    k: float = 0.2
    lam: float = 1.0
    scope: str = "model"
    dare: DARE | None = None
    name = "ties"

    def __post_init__(self) -> None:
        if not 0.0 <= self.k <= 1.0:
            raise SecateursError(f"TIES k (fraction of each task vector kept) must be in [0, 1], got {self.k}")
        if self.scope not in SCOPES:
            raise SecateursError(f"TIES scope must be {' or '.join(SCOPES)}, got {self.scope!r}")

    def to_dict(self) -> dict:
        out = {"method": "dare-ties" if self.dare else self.name, "k": self.k, "lam": self.lam, "scope": self.scope}
        return {**out, "dare": self.dare.to_dict()} if self.dare else out


Method = Average | TaskArithmetic | TIES


# ------------------------------------------------------------------------------------------------- the parts
def _stack(vectors: Sequence[Mapping[str, torch.Tensor]], name: str) -> torch.Tensor:
    return torch.stack([v[name].float() for v in vectors])


def task_arithmetic(base: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]], lam: float):
    """theta_0 + lam * sum_t tau_t."""
    total = {name: _stack(vectors, name).sum(0) for name in vectors[0]}
    return add(base, total, lam)


def average(base: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]]) -> Tensors:
    """theta_0 + mean_t tau_t: the mean of the fine-tuned models."""
    mean = {name: _stack(vectors, name).mean(0) for name in vectors[0]}
    return add(base, mean)


def _kth_largest(values: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count``-th largest entry of a 1-D tensor (count >= 1)."""
    return torch.kthvalue(values, values.numel() - count + 1).values


def trim(vector: Mapping[str, torch.Tensor], k: float, scope: str = "model") -> Tensors:
    """Keep the int(k * n) largest magnitudes of the vector (n: all its entries, or each tensor's with
    ``scope="tensor"``) and zero the rest; entries tied with the smallest kept magnitude are kept too. (The TIES
    reference code keeps one entry more than int(k * n).)"""
    if k >= 1.0:
        return {name: v.float() for name, v in vector.items()}

    def keep_top(v: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
        if threshold is None:
            return torch.zeros_like(v, dtype=torch.float32)
        return torch.where(v.abs() >= threshold, v.float(), torch.zeros((), dtype=torch.float32))

    def threshold_of(magnitudes: torch.Tensor) -> torch.Tensor | None:
        count = int(k * magnitudes.numel())
        return _kth_largest(magnitudes, count) if count > 0 else None

    if scope == "tensor":
        return {name: keep_top(v, threshold_of(v.abs().flatten().float())) for name, v in vector.items()}
    every = torch.cat([v.abs().flatten().float() for v in vector.values()]) if vector else torch.zeros(0)
    threshold = threshold_of(every)
    return {name: keep_top(v, threshold) for name, v in vector.items()}


def elect(vectors: Sequence[Mapping[str, torch.Tensor]]) -> Tensors:
    """Each entry's sign: the sign of the sum of the task vectors' values there (the side with more magnitude).
    An exact tie (sum 0) takes the majority sign of all entries, as the TIES reference code does."""
    signs = {name: torch.sign(_stack(vectors, name).sum(0)) for name in vectors[0]}
    majority = torch.sign(sum((s.sum() for s in signs.values()), torch.zeros(())))
    majority = majority if majority != 0 else torch.ones(())
    return {name: torch.where(s == 0, majority, s) for name, s in signs.items()}


def disjoint_mean(vectors: Sequence[Mapping[str, torch.Tensor]], signs: Mapping[str, torch.Tensor]) -> Tensors:
    """Each entry's mean over the tasks whose value there has the elected sign (0 where none has)."""
    out = {}
    for name, sign in signs.items():
        values = _stack(vectors, name)
        agree = torch.where(sign > 0, values > 0, values < 0)
        total = torch.where(agree, values, torch.zeros((), dtype=values.dtype)).sum(0)
        out[name] = total / agree.sum(0).clamp(min=1)
    return out


def ties(
    base: Mapping[str, torch.Tensor],
    vectors: Sequence[Mapping[str, torch.Tensor]],
    k: float = 0.2,
    lam: float = 1.0,
    scope: str = "model",
) -> Tensors:
    """TIES-merging: trim, elect, disjoint mean, then theta_0 + lam * merged."""
    trimmed = [trim(v, k, scope) for v in vectors]
    return add(base, disjoint_mean(trimmed, elect(trimmed)), lam)


# ----------------------------------------------------------------------------------------------- one verb
def dare_vectors(
    vectors: Sequence[Mapping[str, torch.Tensor]], config: DARE, qs: Sequence[float] | None = None
) -> list[Tensors]:
    """Each task vector dropped and rescaled, task t's masks from (seed, t, tensor name), divided by ``qs[t]``
    (DAREx-q) or the config's q."""
    divisors = [config_q(config, qs[t] if qs else None) for t in range(len(vectors))]
    return [dare(v, config.drop, config.seed, q, t) for t, (v, q) in enumerate(zip(vectors, divisors, strict=True))]


def merge(
    base: Mapping[str, torch.Tensor],
    vectors: Sequence[Mapping[str, torch.Tensor]],
    method: Method,
    qs: Sequence[float] | None = None,
) -> Tensors:
    """Merge task vectors of ``base`` with ``method`` (a config object). Every vector must hold the base's tensors;
    pass only the tensors to merge (a task-specific head stays out of it and stays the task's own).
    ``qs``: DAREx-q's divisor per task (chosen on data) when the method's DARE rescales with ``darex``."""
    if not vectors:
        raise SecateursError("merging needs at least one fine-tuned model")
    for t, v in enumerate(vectors):
        check_match(base, v, f"task vector {t}")
    if isinstance(method, Average):
        return average(base, vectors)
    if getattr(method, "dare", None) is not None:
        vectors = dare_vectors(vectors, method.dare, qs)
    if isinstance(method, TaskArithmetic):
        return task_arithmetic(base, vectors, method.lam)
    if isinstance(method, TIES):
        return ties(base, vectors, method.k, method.lam, method.scope)
    raise SecateursError(f"unknown merge method {method!r}")


METHODS = ("average", "task-arithmetic", "ties", "dare-ta", "dare-ties")


def build_method(name: str, lam: float | None = None, k: float | None = None, dare: DARE | None = None) -> Method:
    """The config of method ``name`` (one of :data:`METHODS`) with the settings given (None: the default; for
    dare-ties the default k is 1.0, no trim). The dare-* methods need ``dare``; the others refuse it."""
    if name not in METHODS:
        raise SecateursError(f"unknown merge method {name!r}: use {', '.join(METHODS)}")
    if name.startswith("dare-") and dare is None:
        raise SecateursError(f"{name} needs DARE settings (drop rate, rescale, seed)")
    if not name.startswith("dare-") and dare is not None:
        raise SecateursError(f"{name} does not drop: use dare-ta or dare-ties for DARE")
    if name == "average":
        if lam is not None or k is not None:
            raise SecateursError("average takes no lambda or k")
        return Average()
    if name in ("task-arithmetic", "dare-ta"):
        if k is not None:
            raise SecateursError(f"k (TIES' trim) is not a setting of {name}")
        return TaskArithmetic(lam=1.0 if lam is None else lam, dare=dare)
    default_k = 1.0 if name == "dare-ties" else 0.2
    return TIES(k=default_k if k is None else k, lam=1.0 if lam is None else lam, dare=dare)
