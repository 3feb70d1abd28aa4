"""Timing and byte accounting for benchmarks: seconds per call, read bandwidth, bytes a model holds and reads per
decode step, greedy decoding timed step by step, and per-shape kernel-versus-dense microbenchmarks."""

from __future__ import annotations

import gc
import inspect
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.measure import rss_bytes
from secateurs.runtime import kernels
from secateurs.runtime.linear import Int8Embedding, SparseLinear


# ---------------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device | None = None, repeat: int = 5, min_sample: float = 0.005) -> float:
    """Median seconds per call of ``fn()``, each sample looping long enough (>= min_sample) to time reliably."""
    device = device or torch.device("cpu")
    fn()
    sync(device)
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_sample or loops >= 1 << 16:
            break
        loops *= 2 if elapsed > min_sample / 8 else 8
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        sync(device)
        samples.append((time.perf_counter() - start) / loops)
    return statistics.median(samples)


def read_bandwidth(nbytes: int = 256 << 20, device: torch.device | None = None, repeat: int = 5) -> float:
    """Streaming read bandwidth in bytes/s: ``sum`` over a buffer much larger than the caches."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / time_call(buffer.sum, device, repeat=repeat, min_sample=0.0)


# ------------------------------------------------------------------------------------------------- accounting
def _address(t: torch.Tensor):
    try:
        return (t.device, t.data_ptr())
    except RuntimeError:  # a tensor subclass without storage of its own (semi-structured sparse)
        return ("object", id(t))


def _unique_tensors(model: nn.Module):
    seen = set()
    for t in [*model.parameters(), *model.buffers()]:
        if _address(t) not in seen:
            seen.add(_address(t))
            yield t


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; for a semi-structured sparse tensor, its packed values and metadata."""
    inner = [getattr(t, name, None) for name in ("packed", "meta", "packed_t", "meta_t")]
    inner = [x for x in inner if isinstance(x, torch.Tensor)]
    if inner:
        return sum(x.numel() * x.element_size() for x in inner)
    return t.numel() * t.element_size()


def _packed_values(model: nn.Module) -> set:
    """Addresses of the packed values of the model's SparseLinears (an int8 embedding may view them)."""
    return {_address(m.packed.values) for m in model.modules() if isinstance(m, SparseLinear)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (tied ones once), packed weights included."""
    shared = _packed_values(model)
    total = sum(_nbytes(t) for t in _unique_tensors(model) if _address(t) not in shared)
    return total + sum(m.nbytes for m in model.modules() if isinstance(m, SparseLinear))


def step_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads: everything but the embedding tables (a row each) unless one is the LM
    head; packed weights as their values and mask (the padding is never read)."""
    output = model.get_output_embeddings()
    head = getattr(output, "weight", None)
    skip = {
        _address(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Embedding) and (head is None or _address(m.weight) != _address(head))
    }
    for m in model.modules():
        if isinstance(m, Int8Embedding):
            skip |= {_address(m.codes), _address(m.scales)}
    skip |= _packed_values(model)
    total = sum(_nbytes(t) for t in _unique_tensors(model) if _address(t) not in skip)
    return total + sum(m.packed.nbytes for m in model.modules() if isinstance(m, SparseLinear))


def rss() -> int:
    """Resident memory of this process in bytes, after a garbage collection."""
    gc.collect()
    return rss_bytes()


# ---------------------------------------------------------------------------------------------------- decoding
def _generation_config(model: nn.Module, new_tokens: int):
    from transformers import GenerationConfig

    eos = getattr(model.generation_config, "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
    pad = eos[0] if isinstance(eos, list) else eos
    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else 0,
    )


def generate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens (the new ones only)."""
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=_generation_config(model, new_tokens),
        )
    return out[:, ids.shape[1] :]


def _cache_argument(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` (transformers 5.24 and later; the older
    ``past_key_values`` is deprecated there) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    """The KV cache a forward returned, under either name (without touching a deprecated attribute)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def decode_loop(model: nn.Module, ids: torch.Tensor, tokens: int, device=None) -> tuple[float, torch.Tensor]:
    """Greedy decoding by hand with the KV cache: (seconds of the ``tokens - 1`` steps after the prefill, the
    ``tokens`` new tokens). Timing the steps alone needs no subtraction, so it stays exact for short runs."""
    device = device or ids.device
    cache = _cache_argument(model)
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        new = [token]
        sync(device)
        start = time.perf_counter()
        for _ in range(tokens - 1):
            out = model(token, **{cache: _cache_of(out)}, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            new.append(token)
        sync(device)
        return time.perf_counter() - start, torch.cat(new, 1)


def prefill_seconds(model: nn.Module, ids: torch.Tensor, device=None) -> float:
    """Seconds of one forward pass over ``ids`` without the KV cache."""
    device = device or ids.device
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids, use_cache=False)
    sync(device)
    return time.perf_counter() - start


def kernel_linears(model: nn.Module) -> list[SparseLinear]:
    """The model's linears on the sparse kernel, its LM head excepted (one put there by ``kernel_head`` is dense)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    return [m for m in model.modules() if isinstance(m, SparseLinear) and m is not head]


# ----------------------------------------------------------------------------------------------- per shape
def microbench(model: nn.Module, dtype: torch.dtype, batch: int, prefill: int, repeat: int = 5) -> list[dict]:
    """For each weight shape among the model's sparse linears (not the LM head): our kernel vs ``F.linear`` (dense),
    seconds per call, at ``batch`` rows (decode) and ``prefill`` rows; ``count`` is how many linears have that
    shape."""
    by_shape: dict[tuple, list[SparseLinear]] = {}
    for module in kernel_linears(model):
        by_shape.setdefault(module.packed.shape, []).append(module)
    rows = []
    for shape, modules in sorted(by_shape.items()):
        module = modules[len(modules) // 2]  # a layer from the middle of the stack
        p = module.packed
        W = kernels.unpack(p).to(dtype)
        row = {"shape": list(shape), "count": len(modules), "density": p.density}
        for label, n in (("decode", batch), ("prefill", prefill)):
            x = torch.randn(n, shape[1]).to(dtype)
            sparse = time_call(lambda x=x, p=p: kernels.spmm(x, p), repeat=repeat)
            dense = time_call(lambda x=x, W=W: F.linear(x, W), repeat=repeat)
            row[label] = {"rows": n, "sparse_s": sparse, "dense_s": dense, "speedup": dense / sparse}
        row["decode"]["sparse_gbps"] = p.nbytes / row["decode"]["sparse_s"] / 1e9
        row["decode"]["dense_gbps"] = W.numel() * W.element_size() / row["decode"]["dense_s"] / 1e9
        rows.append(row)
    return rows
