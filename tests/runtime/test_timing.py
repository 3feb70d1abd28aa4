"""Timing and byte accounting of secateurs.runtime.timing."""

from __future__ import annotations

import copy

import torch
from conftest import VOCAB, tiny_model
from sparse_models import pruned_tiny

from secateurs.runtime import timing
from secateurs.runtime.linear import to_sparse_linears


def test_step_and_weight_bytes():
    model = tiny_model("gpt2")  # tied: the LM head reads the token embedding table, positions only a row
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    total = sum(p.numel() * 4 for p in model.parameters())
    assert timing.weight_bytes(model) == total + sum(b.numel() * b.element_size() for b in model.buffers())
    assert timing.step_bytes(model) == timing.weight_bytes(model) - wpe.numel() * 4
    assert wte.numel() > 0
    sparse = copy.deepcopy(pruned_tiny("gpt2"))
    to_sparse_linears(sparse)
    assert timing.step_bytes(sparse) < timing.step_bytes(model)


def test_time_call_and_bandwidth():
    assert 0 < timing.time_call(lambda: sum(range(100)), repeat=2) < 0.01
    assert timing.read_bandwidth(8 << 20, repeat=2) > 1e8


def test_decode_loop_and_prefill():
    model = pruned_tiny("llama")
    ids = torch.randint(0, VOCAB, (2, 5))
    seconds, tokens = timing.decode_loop(model, ids, 4)
    assert seconds > 0 and tokens.shape == (2, 4)
    assert timing.generate(model, ids, 4).shape == (2, 4)
    assert timing.prefill_seconds(model, ids) > 0
    sparse = copy.deepcopy(model)
    to_sparse_linears(sparse)
    rows = timing.microbench(sparse, torch.float32, batch=1, prefill=8, repeat=1)
    assert {tuple(r["shape"]) for r in rows} == {(64, 64), (32, 64), (96, 64), (64, 96)}
    assert all(r["decode"]["sparse_s"] > 0 and r["prefill"]["rows"] == 8 for r in rows)
    assert timing.rss() > 0
