"""Where calibration windows come from: a source, how many windows of how many tokens, and the seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from secateurs.data.windows import calibration_windows
from secateurs.errors import SecateursError


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
            self._windows = calibration_windows(self.source, tokenizer, self.nsamples, self.seqlen, self.seed)
        return self._windows

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise SecateursError(f"nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise SecateursError(f"seqlen must be at least 2, got {self.seqlen}")

    def to_dict(self) -> dict:
        return {"source": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed}
