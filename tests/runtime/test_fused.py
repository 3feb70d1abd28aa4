"""Linears that share an input multiplied in one kernel call: which are grouped, and that nothing changes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, VOCAB
from sparse_models import pruned_tiny

import secateurs
from secateurs.checkpoint import load_pruned, save_sparse
from secateurs.runtime import kernels, timing
from secateurs.runtime.fused import fuse_shared_inputs, release_shared_inputs
from secateurs.runtime.linear import to_sparse_linears
from secateurs.runtime.modules import SparseLinear

# the linears each family's decoder layer feeds one input (the rest take inputs of their own)
SHARED = {
    "llama": [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")],
    "mistral": [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")],
    "qwen2": [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")],
    "gemma3": [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")],
    "opt": [("q_proj", "k_proj", "v_proj")],
    "gpt2": [],  # q, k and v are already one Conv1D (c_attn)
    "gpt_neox": [],  # one query_key_value linear
    "phi3": [],  # qkv_proj and gate_up_proj are already one linear each
}


def sparse_pair(family: str, values: str | None = None):
    model = pruned_tiny(family)
    to_sparse_linears(model)
    if values == "int8":
        for m in model.modules():
            if isinstance(m, SparseLinear):
                m.packed = kernels.pack(kernels.unpack(m.packed), "int8")
    return model, copy.deepcopy(model)


def layers(model) -> int:
    return model.config.num_hidden_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_are_the_linears_that_share_an_input(family):
    model, _ = sparse_pair(family)
    summary = fuse_shared_inputs(model)
    want = SHARED[family]
    assert summary["groups"] == len(want) * layers(model)
    assert summary["calls_saved"] == sum(len(g) - 1 for g in want) * layers(model)
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            leaf = name.rsplit(".", 1)[-1]
            group = next((g for g in want if leaf in g), None)
            if group is None:
                assert m.shared is None, name
            else:
                members = [n.rsplit(".", 1)[-1] for n in _names(model, m.shared[0].members)]
                assert tuple(members) == group and name.rsplit(".", 1)[0] in _names(model, m.shared[0].members)[0]


def _names(model, modules):
    by_id = {id(m): n for n, m in model.named_modules()}
    return [by_id[id(m)] for m in modules]


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("values", [None, "int8"])
def test_outputs_are_unchanged(family, values):
    """One token (the decode kernel, row by row) gives bit-identical logits; a prompt (tiled dense matmuls over
    a longer weight) agrees to fp32 rounding; greedy decoding gives the same tokens. The members' packed weights
    view the group's memory (held once) and unpack to what they held."""
    fused, plain = sparse_pair(family, values)
    before = {n: kernels.unpack(m.packed) for n, m in plain.named_modules() if isinstance(m, SparseLinear)}
    held = timing.weight_bytes(plain)
    fuse_shared_inputs(fused)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        for rows in (1, 9):
            a, b = fused(ids[:, :rows]).logits, plain(ids[:, :rows]).logits
            if rows == 1:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    kernels.set_prefill_rows(2)  # the tiled path on both
    try:
        with torch.no_grad():
            torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    finally:
        kernels.set_prefill_rows(None)
    assert torch.equal(timing.generate(fused, ids, 5), timing.generate(plain, ids, 5))
    for name, m in fused.named_modules():
        if isinstance(m, SparseLinear):
            assert torch.equal(kernels.unpack(m.packed), before[name])
            if m.shared is not None:
                group = m.shared[0].fused.values
                start = group.data_ptr()
                assert start <= m.packed.values.data_ptr() < start + group.numel() * group.element_size()
    assert abs(timing.weight_bytes(fused) - held) < 0.01 * held


def test_the_cache_serves_only_the_same_unmodified_input():
    """A member called with another tensor, or after the shared one was changed in place, gets its own product."""
    model, _ = sparse_pair("llama")
    fuse_shared_inputs(model)
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    x, other = torch.randn(1, 3, q.in_features), torch.randn(1, 3, q.in_features)

    def alone(m, t):
        return kernels.spmm(t, m.packed, m.bias)

    assert torch.equal(q(x), alone(q, x))
    assert torch.equal(k(other), alone(k, other))  # not x: computed for `other`
    assert torch.equal(v(x), alone(v, x))
    assert torch.equal(q(x), alone(q, x))
    x.mul_(2)  # changed in place after q's call: k must not get the old product
    assert torch.equal(k(x), alone(k, x))
    assert torch.equal(q(x), alone(q, x)) and torch.equal(q(x), alone(q, x))  # twice in a row: recomputed, same
    group = q.shared[0]
    for m in (k, v):
        m(x)
    assert group._x is None  # every member served: the input and product are not held any longer


def test_saving_a_fused_model_and_thresholding_it(tmp_path):
    """save_sparse writes each linear as it is (reloaded bit-identically); activation sparsity on the kernel lets
    the thresholded linears run on their own, with the same outputs as without grouping."""
    fused, plain = sparse_pair("llama")
    fuse_shared_inputs(fused)
    save_sparse(fused, None, tmp_path / "s", progress=False)
    again, _ = load_pruned(tmp_path / "s")
    dense = {n: m.weight for n, m in again.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, m in plain.named_modules():
        if isinstance(m, SparseLinear):
            assert torch.equal(dense[name], kernels.unpack(m.packed))
    windows = torch.randint(0, VOCAB, (2, 16))
    for model in (fused, plain):
        secateurs.sparsify_activations(model, 0.4, windows=windows, kernel=True)
    assert not any(getattr(m, "shared", None) for m in fused.modules())
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_release_and_nothing_to_fuse():
    model, plain = sparse_pair("llama")
    fuse_shared_inputs(model)
    release_shared_inputs(model)
    assert not any(getattr(m, "shared", None) for m in model.modules())
    ids = torch.randint(0, VOCAB, (1, 1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    assert fuse_shared_inputs(torch.nn.Sequential(torch.nn.Linear(4, 4)))["groups"] == 0
