"""Measurements shared by every command: resident and peak memory, and the versions of what ran."""

from __future__ import annotations

import os
import platform
import resource
import threading
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
