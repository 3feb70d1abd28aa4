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


def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def give_back_memory() -> None:
    """Return freed heap memory to the system. glibc keeps it otherwise: tensors of a few MB (a layer's weights,
    the tokenizer's work on a long text) land on the heap, and the process stays as large as its largest moment."""
    if _TRIM is not None:
        _TRIM(0)


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


def _size_bytes(text: str) -> int | None:
    """``32K`` / ``1024K`` / ``32M`` (as sysfs writes cache sizes) in bytes."""
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (ValueError, IndexError):
        return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cpu_count(cpu_list: str) -> int | None:
    """How many CPUs a sysfs list such as ``0-1,4`` names."""
    try:
        total = 0
        for part in cpu_list.split(","):
            a, _, b = part.partition("-")
            total += int(b or a) - int(a) + 1
        return total
    except ValueError:
        return None


def cpu_info() -> dict:
    """The CPU a benchmark ran on: model name, logical CPUs, and the data caches by level (bytes, and how many
    CPUs share each), from /proc/cpuinfo and sysfs on Linux; what cannot be read is None or left out."""
    info: dict = {"model": platform.processor() or None, "cpus": os.cpu_count(), "caches": {}}
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            info["model"] = line.split(":", 1)[1].strip()
            break
    base = "/sys/devices/system/cpu/cpu0/cache"
    entries = sorted(os.listdir(base)) if os.path.isdir(base) else []
    for entry in entries:
        folder = os.path.join(base, entry)
        kind, level, size = (_read(os.path.join(folder, n)) for n in ("type", "level", "size"))
        if not entry.startswith("index") or kind in (None, "Instruction") or level is None or size is None:
            continue
        shared = _read(os.path.join(folder, "shared_cpu_list"))
        info["caches"][f"L{level}"] = {
            "bytes": _size_bytes(size),
            "shared_by_cpus": _cpu_count(shared) if shared else None,
        }
    levels = sorted(info["caches"])
    info["last_level_cache_bytes"] = info["caches"][levels[-1]]["bytes"] if levels else None
    return info
