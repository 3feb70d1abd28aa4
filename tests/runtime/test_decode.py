"""The lean decode loop: transformers' Llama-family computation with fewer calls, checked against transformers
itself (logits at every step, greedy tokens), on dense and sparse (fused) models, and its refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from secateurs.errors import SecateursError
from secateurs.runtime import timing
from secateurs.runtime.decode import LeanDecoder, lean_loop_seconds, why_not
from secateurs.runtime.fused import fuse_shared_inputs
from secateurs.runtime.linear import to_sparse_linears

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=120, max_position_embeddings=64)


def _model(family: str, **extra):
    torch.manual_seed(0)
    if family == "llama":  # grouped-query attention, a scaled RoPE
        config = LlamaConfig(
            **SIZES,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            **extra,
        )
        return LlamaForCausalLM(config).eval()
    if family == "qwen2":  # biases on q/k/v, tied embedding
        config = Qwen2Config(**SIZES, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, **extra)
        return Qwen2ForCausalLM(config).eval()
    extra.setdefault("sliding_window", None)
    config = MistralConfig(**SIZES, num_attention_heads=4, num_key_value_heads=1, **extra)
    return MistralForCausalLM(config).eval()


def _hf_logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits[:, -1]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_logits_and_greedy_tokens_equal_transformers(family):
    model = _model(family)
    if family == "qwen2":  # transformers initialises the q/k/v biases to zero: give them values
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    ids = torch.randint(0, 120, (1, 9), generator=torch.Generator().manual_seed(1))
    decoder = LeanDecoder(model)
    torch.testing.assert_close(decoder.prefill(ids), _hf_logits(model, ids), rtol=1e-5, atol=1e-5)
    new = decoder.generate(ids, 10)
    assert torch.equal(new, timing.generate(model, ids, 10))
    # each step's logits equal a full forward over everything so far
    decoder.prefill(ids)
    for i in range(new.shape[1] - 1):
        got = decoder.step(new[:, i : i + 1])
        torch.testing.assert_close(got, _hf_logits(model, torch.cat([ids, new[:, : i + 1]], 1)), rtol=1e-5, atol=1e-5)


def test_a_sparse_model_with_fused_groups_decodes_as_transformers_does():
    """The linears on the kernel, q/k/v and gate/up each grouped into one call: the same tokens as transformers'
    loop over the same sparse model, and as the pruned dense model."""
    model = _model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            for m in (*layer.self_attn.children(), *layer.mlp.children()):
                if isinstance(m, torch.nn.Linear):
                    w = m.weight
                    w[w.abs() < w.abs().median()] = 0
    ids = torch.randint(0, 120, (1, 7), generator=torch.Generator().manual_seed(2))
    want = timing.generate(model, ids, 8)
    to_sparse_linears(model)
    assert fuse_shared_inputs(model)["groups"] > 0
    seconds, new = lean_loop_seconds(LeanDecoder(model), ids, 8)
    assert seconds > 0 and torch.equal(new, want)
    assert torch.equal(timing.decode_loop(model, ids, 8)[1], want)


def test_bfloat16_stays_close_to_transformers():
    model = _model("llama").to(torch.bfloat16)
    ids = torch.randint(0, 120, (1, 6), generator=torch.Generator().manual_seed(3))
    decoder = LeanDecoder(model)
    torch.testing.assert_close(decoder.prefill(ids).float(), _hf_logits(model, ids).float(), rtol=0.03, atol=0.03)


def test_refusals_name_the_reason():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    assert "not gpt2" in why_not(gpt2)
    with pytest.raises(SecateursError, match="not gpt2"):
        LeanDecoder(gpt2)
    assert "SiLU" in why_not(_model("llama", hidden_act="gelu"))
    decoder = LeanDecoder(_model("llama"), max_len=8)
    with pytest.raises(SecateursError, match="one sequence"):
        decoder.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(SecateursError, match="exceed"):
        decoder.generate(torch.zeros(1, 5, dtype=torch.long), 5)  # 5 + 4 steps > 8
    window = LeanDecoder(_model("mistral", sliding_window=6))
    with pytest.raises(SecateursError, match="sliding window"):
        window.generate(torch.zeros(1, 4, dtype=torch.long), 4)
    assert window.generate(torch.zeros(1, 4, dtype=torch.long), 3).shape == (1, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    """The native norm against transformers' LlamaRMSNorm: bfloat16 bit for bit, float32 to rounding; a
    non-contiguous x or a weight of another dtype takes torch's ops."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from secateurs.runtime import kernels

    norm = LlamaRMSNorm(37, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(37) * 0.3 + 1)
    norm = norm.to(dtype)
    x = (torch.randn(2, 5, 37) * 4).to(dtype)
    with torch.no_grad():
        want = norm(x)
    got = kernels.rms_norm(x, norm.weight.detach(), norm.variance_epsilon)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    strided = x.transpose(0, 1)
    with torch.no_grad():
        assert torch.allclose(kernels.rms_norm(strided, norm.weight.detach(), 1e-5).float(), norm(strided).float())
    # the sum of squares does not overflow float32 in the native path (summed in float64)
    if kernels.native_available():
        big = torch.full((1, 37), 3e19)
        assert torch.allclose(kernels.rms_norm(big, torch.ones(37), 1e-5), torch.ones(1, 37))


@pytest.mark.parametrize("heads,kv_heads,length,d", [(9, 3, 100, 64), (8, 8, 7, 32), (4, 1, 1, 16), (6, 2, 37, 24)])
def test_attend_matches_scaled_dot_product_attention(heads, kv_heads, length, d):
    """One query over the first ``length`` positions of a float32 cache (grouped heads as transformers pairs them),
    against torch's attention; d a multiple of 16 takes the AVX-512 path where present, 24 the generic one."""
    from secateurs.runtime import kernels

    q = torch.randn(1, heads, 1, d)
    k, v = torch.randn(1, kv_heads, 50 + length, d), torch.randn(1, kv_heads, 50 + length, d)
    got = kernels.attend(q, k, v, length, 0.3)
    if not kernels.native_available():
        assert got is None
        return
    want = F.scaled_dot_product_attention(
        q, k[:, :, :length], v[:, :, :length], scale=0.3, enable_gqa=heads != kv_heads
    )
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    # what it does not take: the caller falls back to torch's attention
    assert kernels.attend(q.bfloat16(), k, v, length, 0.3) is None
    assert kernels.attend(q, k[:, :, :, :8], v[:, :, :, :8], length, 0.3) is None
    assert kernels.attend(q, k, v, 60 + length, 0.3) is None
    assert kernels.attend(torch.randn(1, heads, 2, d), k, v, length, 0.3) is None
