"""Tiny random-config causal LMs of many families, built in code (offline, a few hundred kB each)."""

from __future__ import annotations

import pytest
import torch
import transformers

VOCAB = 128


GQA = dict(num_key_value_heads=2)
STANDARD = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
# family -> (config class name, arguments): small enough to build in milliseconds, large enough for N:M groups
CONFIGS = {
    "llama": ("LlamaConfig", {**STANDARD, **GQA, "num_hidden_layers": 3}),
    "mistral": ("MistralConfig", {**STANDARD, **GQA, "sliding_window": 16}),
    "qwen2": ("Qwen2Config", {**STANDARD, **GQA}),
    "gemma3": (
        "Gemma3TextConfig",
        {
            **STANDARD,
            **GQA,
            "num_hidden_layers": 3,
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
    ),
    "opt": (
        "OPTConfig",
        {"hidden_size": 64, "ffn_dim": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "word_embed_proj_dim": 64},
    ),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    "gpt_neox": ("GPTNeoXConfig", STANDARD),
    "phi3": ("Phi3Config", {**STANDARD, **GQA, "pad_token_id": 0}),
}


def _config(family: str):
    name, kwargs = CONFIGS[family]
    extra = {} if family == "gpt2" else {"max_position_embeddings": 128}
    return getattr(transformers, name)(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **extra, **kwargs)


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
    torch.set_num_threads(1)  # tiny models: threads cost more than they bring


# ------------------------------------------------------------------------------- saved model folders (CLI tests)
TOKENIZER_VOCAB = 300  # 256 byte tokens + <s> + </s>, rounded up: the vocab of the saved tiny models


def byte_level_tokenizer(bos: bool = True):
    """An offline fast tokenizer built in code: token id = UTF-8 byte (0-255), plus ``<s>`` (256) and ``</s>`` (257).

    With ``bos`` it puts ``<s>`` in front of every encoded text (as LLaMA's does), so the perplexity protocol
    uses BOS windows; without, it has no BOS token at all (like GPT-2 style tokenizers used without one).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    chars = {b: chr(b if b in keep else next(extra)) for b in range(256)}
    vocab = {chars[b]: b for b in range(256)}
    vocab.update({"<s>": 256, "</s>": 257})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 256)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", model_max_length=1024
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", model_max_length=1024)


def save_tiny_model_dir(folder, family: str = "llama", bos: bool = True, seed: int = 0):
    """Save a tiny random ``family`` model (vocab 300) and :func:`byte_level_tokenizer` as a normal HF folder."""
    torch.manual_seed(seed)
    config = _config(family)
    config.vocab_size = TOKENIZER_VOCAB
    config.bos_token_id = 256 if bos else None
    config.eos_token_id = 257
    config.pad_token_id = None
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    byte_level_tokenizer(bos).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny LLaMA (3 layers, vocab 300) with an offline byte-level tokenizer (BOS), saved to a folder."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", bos=True)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 (Conv1D linears, vocab 300), tokenizer without BOS, saved to a folder."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2", bos=False)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small local English .txt file (the first 6000 characters of the bundled Bible) for calibration/eval."""
    from secateurs.data import read_text

    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(read_text("bible")[:6000], encoding="utf-8")
    return path


def run_main(*argv) -> tuple[int, str, str]:
    """``secateurs.cli.main(argv)`` in-process: (exit code, stdout, stderr). argparse errors come back as their code."""
    import contextlib
    import io

    from secateurs import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()
