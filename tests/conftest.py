"""Tiny random-config causal LMs of many families, built in code (offline, a few hundred kB each)."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

VOCAB = 128


def _config(family: str):
    t = transformers
    common = dict(vocab_size=VOCAB)
    if family == "llama":
        return t.LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
    if family == "mistral":
        return t.MistralConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            sliding_window=16,
            **common,
        )
    if family == "qwen2":
        return t.Qwen2Config(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
    if family == "gemma3":
        return t.Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **common,
        )
    if family == "opt":
        return t.OPTConfig(
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=128,
            **common,
        )
    if family == "gpt2":
        return t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2, **common)
    if family == "gpt_neox":
        return t.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            **common,
        )
    if family == "phi3":
        return t.Phi3Config(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "opt", "gpt2", "gpt_neox", "phi3"]


def tiny_model(family: str = "llama", seed: int = 0):
    """A randomly initialised causal LM of ``family`` in eval mode (deterministic for a seed)."""
    torch.manual_seed(seed)
    config = _config(family)
    config._attn_implementation = "eager" if family == "gemma3" else "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
