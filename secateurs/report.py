"""Measurements shared by the API and CLI: peak memory, versions, the pruning report."""

from __future__ import annotations

import os
import platform
import resource
import threading
from dataclasses import asdict, dataclass, field
from importlib import metadata

import torch


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the lifetime peak
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process over its lifetime."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


class PeakMemory:
    """Peak RSS (sampled every 20 ms) and peak CUDA memory while the block runs."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start_rss = self.peak_rss = 0
        self.peak_cuda = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, rss_bytes())

    def __enter__(self):
        self.start_rss = self.peak_rss = rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, rss_bytes())
        if torch.cuda.is_available():
            self.peak_cuda = torch.cuda.max_memory_allocated()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("secateurs", "torch", "transformers", "safetensors", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    out["threads"] = torch.get_num_threads()
    return out


@dataclass
class PruneReport:
    """What a pruning run did: recipe, protocol, achieved sparsity per linear, time and memory."""

    recipe: dict
    calibration: dict | None
    device: str
    prune_seconds: float
    rss_before_bytes: int  # resident memory when pruning started (the model is already loaded)
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    layers: list[dict]
    versions: dict = field(default_factory=versions)

    @property
    def linears(self) -> list[dict]:
        return [lin for layer in self.layers for lin in layer["linears"]]

    @property
    def pruned_weights(self) -> int:
        return sum(lin["zeros"] for lin in self.linears)

    @property
    def prunable_weights(self) -> int:
        return sum(lin["numel"] for lin in self.linears)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned linears."""
        total = self.prunable_weights
        return self.pruned_weights / total if total else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["sparsity"] = self.sparsity
        data["pruned_weights"] = self.pruned_weights
        data["prunable_weights"] = self.prunable_weights
        return data
