"""What to do to a model: method, sparsity or N:M pattern, which linears to leave alone. JSON round-trip."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from secateurs import data
from secateurs.errors import SecateursError
from secateurs.methods import METHODS
from secateurs.patterns import NM, check_sparsity, parse_nm


@dataclass
class Recipe:
    """A pruning recipe.

    ``sparsity`` is the fraction of weights zeroed in every prunable linear of the decoder layers (unstructured);
    ``pattern`` ("2:4": 2 zeros in every 4 consecutive input weights of a row) replaces it when given.
    ``exclude`` holds glob patterns of linear names (e.g. ``"*.mlp.down_proj"``) to leave dense.
    Embeddings and the LM head are never pruned.
    """

    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str | None = None
    exclude: list[str] = field(default_factory=list)
    blocksize: int = 128  # SparseGPT column block
    percdamp: float = 0.01  # SparseGPT damping, fraction of mean(diag H)
    allocation: str = "uniform"  # per-layer sparsity: "uniform", "owl", or a JSON file layer -> sparsity
    owl_m: float = 5.0  # OWL: a score is an outlier above owl_m x the layer's mean score
    owl_lambda: float = 0.08  # OWL: layer sparsities span target +- owl_lambda
    refine: str | None = None  # training-free refinement after the method's mask: None or "dsnot"
    dsnot_cycles: int = 50  # DSnoT: at most this many prune-and-grow swaps per row
    dsnot_threshold: float = 0.1  # DSnoT: stop a row once |reconstruction error proxy| <= threshold
    dsnot_power: float = 1.0  # DSnoT: regrowth criterion divides by var(x_j) ** power
    dsnot_targets: list[str] = field(default_factory=list)  # globs of linears to refine; empty = all pruned

    def __post_init__(self) -> None:
        self.method = str(self.method).lower()
        if self.method not in METHODS:
            raise SecateursError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.pattern is not None:
            self.pattern = str(self.nm)
            self.sparsity = self.nm.sparsity
        self.sparsity = check_sparsity(self.sparsity)
        if self.blocksize < 1:
            raise SecateursError(f"blocksize must be positive, got {self.blocksize}")
        if not (0 < self.percdamp):
            raise SecateursError(f"percdamp must be positive, got {self.percdamp}")
        self.exclude = list(self.exclude)
        if self.allocation not in ("uniform", "owl") and not str(self.allocation).endswith(".json"):
            raise SecateursError(
                f"unknown allocation {self.allocation!r}: use uniform, owl, or a .json file layer -> sparsity"
            )
        if self.refine is not None:
            self.refine = str(self.refine).lower()
            if self.refine in ("", "none"):
                self.refine = None
            elif self.refine != "dsnot":
                raise SecateursError(f"unknown refinement {self.refine!r}: use dsnot (or none)")
        if self.dsnot_cycles < 0 or self.dsnot_threshold < 0 or self.dsnot_power < 0:
            raise SecateursError("dsnot cycles, threshold and power must be non-negative")
        self.dsnot_targets = list(self.dsnot_targets)
        if self.owl_m <= 0 or not 0 <= self.owl_lambda < 0.5:
            raise SecateursError(f"need owl_m > 0 and 0 <= owl_lambda < 0.5, got {self.owl_m}, {self.owl_lambda}")

    @property
    def needs_calibration(self) -> bool:
        """Magnitude pruning needs no data, unless OWL needs the dense activations."""
        return self.method != "magnitude" or self.allocation == "owl" or self.refine is not None

    @property
    def nm(self) -> NM | None:
        return parse_nm(self.pattern) if self.pattern is not None else None

    @property
    def pattern_name(self) -> str:
        allocation = "" if self.allocation == "uniform" else f", {self.allocation} allocation"
        if self.refine:
            allocation += f", {self.refine}"
        return f"{self.pattern} (N:M){allocation}" if self.pattern else f"{self.sparsity:g} unstructured{allocation}"

    def excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SecateursError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SecateursError(f"cannot read recipe {path}: {exc}") from None


@dataclass
class Calibration:
    """Where calibration windows come from: ``nsamples`` seeded windows of ``seqlen`` tokens of ``source``."""

    source: str = "shakespeare"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    _windows: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def windows(self, tokenizer) -> torch.Tensor:
        """The token windows [nsamples, seqlen] (tokenised once, then cached on this object)."""
        if self._windows is None:
            self._windows = data.calibration_windows(self.source, tokenizer, self.nsamples, self.seqlen, self.seed)
        return self._windows

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise SecateursError(f"nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise SecateursError(f"seqlen must be at least 2, got {self.seqlen}")

    def to_dict(self) -> dict:
        return {"source": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed}
