"""What a stage of a one-shot recipe is: a typed config object with one pure function and declared statistics.

Four kinds, applied in this order to every decoder layer:

* an :class:`Allocation` turns the recipe's target into one sparsity per decoder layer (optionally from one pass
  through the dense model, whose statistics it declares);
* a :class:`Pruner` chooses a linear's mask from its weight, its input statistics and the target (and may set new
  values for the kept weights);
* a :class:`Refiner` changes the mask afterwards, keeping every row's (and N:M group's) count;
* an :class:`Update` sets new values for the kept weights of a fixed mask.

Each config is a frozen dataclass. Its fields are the stage's settings: defaults, types and ``help`` metadata are
the one source of truth from which the command line's flags, the sweep's axes and the recipe file are made.
``needs`` names the input statistics the stage reads (fields of :class:`secateurs.oneshot.stats.InputStats`), so
the engine collects exactly those and never asks which method it runs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from secateurs.errors import SecateursError
from secateurs.oneshot.select import NM

# the statistics a stage may declare (what InputStats can sum over calibration tokens)
SUM_SQUARES = "sq_norm"  # sum x_j^2 per input feature
GRAM = "H_sum"  # sum x x^T (the Hessian of the layer-wise reconstruction loss, up to 2/n)
MEAN = "x_sum"  # sum x_j (means and, with SUM_SQUARES, variances)
WINDOW_SQUARES = "window_sq"  # sum over windows of (sum of x_j in the window)^2 / tokens of the window
STATISTICS = (SUM_SQUARES, GRAM, MEAN, WINDOW_SQUARES)


@dataclass(frozen=True)
class Target:
    """How sparse one linear must become: a fraction of zeros, or N zeros in every M consecutive inputs of a row."""

    sparsity: float
    nm: NM | None = None


@dataclass
class StageOutput:
    """A linear stage's result: the weight (same shape and dtype as given), its mask (True = pruned) and details."""

    weight: torch.Tensor
    mask: torch.Tensor
    info: dict = field(default_factory=dict)


NUMBER_OR_AUTO = "float | str"  # the type of a setting that is a number or "auto" (chosen by a search)


def number_or_auto(text: str) -> float | str:
    """A command-line value of a number-or-auto setting."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number or auto, got {text!r}") from None


def option(default, help: str, **kwargs):
    """A stage setting: its default and the help text its command-line flag shows."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class Stage:
    """Common to every stage: a registered ``name``, a one-line ``summary``, declared statistics ``needs``."""

    name: ClassVar[str]
    kind: ClassVar[str]
    summary: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    # extra command-line spellings of a field's flag, e.g. {"blocksize": ("--blocksize",)}
    flag_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}

    def options(self) -> dict:
        """The settings as plain values (JSON/YAML-ready)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_options(cls, options: dict | None = None):
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SecateursError(
                f"unknown setting(s) for {cls.name}: {', '.join(unknown)} (known: {', '.join(sorted(known)) or 'none'})"
            )
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        return cls(**{k: _typed(cls.name, k, types[k], v) for k, v in options.items()})

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            raise SecateursError(f"{self.name}: {message}")


def _typed(stage: str, name: str, kind: str, value):
    """A setting read from a file or a dict, checked against its field's type (one clear error otherwise)."""
    if kind == NUMBER_OR_AUTO:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise SecateursError(f"{stage}: setting {name} must be a number or auto, got {value!r}")
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind.startswith("tuple") and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    expected = {"int": int, "bool": bool, "str": str}.get(kind)
    if expected is not None and isinstance(value, expected) and (expected is bool or not isinstance(value, bool)):
        return value
    words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
    raise SecateursError(f"{stage}: setting {name} must be {words.get(kind, 'a list of strings')}, got {value!r}")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Pruner(Stage):
    """Chooses the mask of one linear."""

    kind: ClassVar[str] = "pruner"

    def prune(self, W: torch.Tensor, stats, target: Target) -> StageOutput:
        """``W`` [rows, cols] (a copy: free to modify); ``stats`` the linear's InputStats (None without ``needs``)."""
        raise NotImplementedError

    def score(self, W: torch.Tensor, stats) -> torch.Tensor | None:
        """The pruner's saliency of each weight of the dense ``W`` (lower: pruned first), for a refiner that ranks by
        "the initial method's own score"; None when the pruner has no single score."""
        return None

    def reconstruct(self, W_dense: torch.Tensor, W: torch.Tensor, mask: torch.Tensor, stats, target: Target):
        """For a pruner that sets new values for the kept weights: the same reconstruction on another ``mask`` (a
        :class:`StageOutput`), so that a refiner's changed mask gets weights solved for it; None for a pruner that
        keeps the dense values."""
        return None


@dataclass(frozen=True)
class Refiner(Stage):
    """Changes a linear's mask after the pruner, keeping each row's count of pruned weights (and N:M groups)."""

    kind: ClassVar[str] = "refiner"
    targets: tuple[str, ...] = option((), "refine only linears whose name matches (globs; empty: every pruned one)")

    def applies(self, name: str) -> bool:
        return not self.targets or any(fnmatch.fnmatchcase(name, pat) for pat in self.targets)

    def refine(
        self, W_dense: torch.Tensor, W: torch.Tensor, mask: torch.Tensor, stats, target: Target, pruner=None
    ) -> StageOutput:
        """``pruner``: the :class:`Pruner` that chose ``mask`` (for its :meth:`Pruner.score` and
        :meth:`Pruner.reconstruct`), or None."""
        raise NotImplementedError


@dataclass(frozen=True)
class Update(Stage):
    """Sets new values for the kept weights of a fixed mask (pruned weights stay zero)."""

    kind: ClassVar[str] = "update"

    def update(self, W_dense: torch.Tensor, W: torch.Tensor, mask: torch.Tensor, stats, target: Target) -> StageOutput:
        raise NotImplementedError


@dataclass(frozen=True)
class Allocation(Stage):
    """Turns the recipe's target into one sparsity per decoder layer (the mean stays the target).

    With ``needs`` non-empty, the engine first runs the calibration windows through the dense model and calls
    :meth:`measure` for every decoder layer with its linears' weights and input statistics.
    """

    kind: ClassVar[str] = "allocation"

    def measure(self, weights: dict[str, torch.Tensor], stats: dict) -> dict:
        """What this allocation reads off one dense decoder layer (kept in the report under the layer)."""
        return {}

    def allocate(self, target: float, layer_names: list[str], measures: list[dict] | None) -> list[float]:
        raise NotImplementedError
