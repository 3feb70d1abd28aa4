"""Input statistics of a linear over the calibration tokens: sums, so they add across batches and processes.

Which sums are kept is decided by the stages of the recipe (their ``needs``); counts are always kept. Each window's
contribution is computed in fp32 and added into fp64 totals, which :meth:`InputStats.finish` rounds to fp32 once all
windows (of every process) are in: the order in which windows are added, or processes summed, then leaves no trace
in the fp32 sums the stages read, so several processes compute the masks one process would.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from secateurs.oneshot.stage import GRAM, MEAN, STATISTICS, SUM_SQUARES, WINDOW_SQUARES


@dataclass
class InputStats:
    """Sums over calibration tokens of one linear's inputs x [tokens, cols]."""

    nsamples: int = 0  # calibration windows
    ntokens: int = 0  # calibration tokens
    sq_norm: torch.Tensor | None = None  # sum x_j^2, [cols]
    H_sum: torch.Tensor | None = None  # sum x x^T, [cols, cols]
    x_sum: torch.Tensor | None = None  # sum x_j, [cols]
    window_sq: torch.Tensor | None = None  # sum over windows w of (sum_{t in w} x_tj)^2 / L_w, [cols]

    def add(self, x: torch.Tensor, wanted: Iterable[str], windows: int = 1) -> None:
        """Add one window's inputs [..., cols]; ``wanted`` names the sums to keep (fp64 until :meth:`finish`).

        ``windows`` > 1: ``x`` holds that many windows of equal length ([windows, L, cols] or [windows * L, cols]),
        and each window's sums are added on their own, in order: a batch adds exactly what its windows one by one
        would."""
        if windows > 1:
            if x.shape[-1] == 0 or x.numel() % (windows * x.shape[-1]):
                raise ValueError(f"inputs of shape {tuple(x.shape)} do not split into {windows} windows")
            for part in x.reshape(windows, 1, -1, x.shape[-1]):
                self.add(part, wanted)
            return
        wanted = set(wanted)
        self.nsamples += x.shape[0] if x.dim() > 2 else 1
        if WINDOW_SQUARES in wanted and x.numel():
            per_window = x.reshape(-1, x.shape[-2], x.shape[-1]).float() if x.dim() > 1 else x.reshape(1, 1, -1)
            sums = per_window.sum(1)
            self.window_sq = _plus(self.window_sq, (sums * sums).sum(0) / per_window.shape[1])
        x = x.reshape(-1, x.shape[-1]).float()
        self.ntokens += x.shape[0]
        if SUM_SQUARES in wanted:
            self.sq_norm = _plus(self.sq_norm, (x * x).sum(0))
        if GRAM in wanted:
            self.H_sum = _plus(self.H_sum, x.t() @ x)
        if MEAN in wanted:
            self.x_sum = _plus(self.x_sum, x.sum(0))

    def sums(self) -> dict[str, torch.Tensor | None]:
        return {name: getattr(self, name) for name in STATISTICS}

    def finish(self) -> InputStats:
        """Round the fp64 totals to the fp32 sums the stages read (once every window is in)."""
        for name, total in self.sums().items():
            if total is not None and total.dtype == torch.float64:
                setattr(self, name, total.float())
        return self

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and (population) variance over all tokens (needs the sums of x and x^2)."""
        mean = self.x_sum / self.ntokens
        return mean, (self.sq_norm / self.ntokens - mean * mean).clamp_min(0)

    def window_var(self) -> torch.Tensor:
        """Per-feature variance within each window, averaged over windows weighted by their tokens (needs the sums
        of x^2 and of the window sums squared): what accumulating ``torch.var`` window by window gives."""
        return ((self.sq_norm - self.window_sq) / self.ntokens).clamp_min(0)


def _plus(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value.double() if total is None else total.add_(value)


def check_statistics(names: Iterable[str]) -> frozenset[str]:
    names = frozenset(names)
    unknown = names - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {STATISTICS}")
    return names


class StatsCollector:
    """Forward hooks that accumulate each linear's input statistics.

    Linears fed the very same tensor (q/k/v, gate/up) share one statistics object, so the sums (and x x^T) are
    computed once per distinct input. The inputs seen in the current window are held, so their memory cannot be
    reused by another tensor and mistaken for the same input.
    """

    def __init__(self, stats: dict[str, InputStats], wanted: Iterable[str]):
        self.stats, self.wanted = stats, check_statistics(wanted)
        self.seen: dict[tuple, tuple[torch.Tensor, InputStats]] = {}
        self.windows = 1  # calibration windows in the batch now running through the layer

    def hook(self, name: str):
        def accumulate(module, inputs, output):
            x = inputs[0].detach()
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
            if key in self.seen:
                self.stats[name] = self.seen[key][1]
                return
            self.stats[name].add(x, self.wanted, self.windows)
            self.seen[key] = (x, self.stats[name])

        return accumulate

    def next_window(self) -> None:
        self.seen.clear()
