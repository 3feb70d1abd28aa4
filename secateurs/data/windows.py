"""Seeded token windows for calibration and the evaluation token stream, from any text source.

Protocols follow the Wanda / SparseGPT reference code for the hub sources (see :func:`calibration_windows` and
:func:`evaluation_tokens`), and a simple seeded equivalent for everything else. Deterministic for a given source,
tokenizer and seed; every user error raises ``SecateursError`` with a one-line message.
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager

import torch

from secateurs.data import _hub
from secateurs.data.sources import check_nonempty, read_text, resolve_source
from secateurs.errors import SecateursError

C4_EVAL_DOCUMENTS = 1100  # SparseGPT protocol: " ".join(first 1100 validation documents)


@contextmanager
def _quiet_tokenizer_logs():
    """Silence "Token indices sequence length is longer than the specified maximum ..." and its kin."""
    loggers = [logging.getLogger(n) for n in ("transformers.tokenization_utils_base", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _encode(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of ``text`` (one call, so the whole text is tokenised once)."""
    with _quiet_tokenizer_logs():
        try:
            encoded = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)
        except TypeError:  # a tokenizer whose __call__ takes no ``verbose``
            encoded = tokenizer(text, add_special_tokens=add_special_tokens)
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    if ids and isinstance(ids[0], list):  # batched output for a single text
        ids = ids[0]
    return list(ids)


def _tokens(source_label: str, tokenizer, text: str) -> torch.Tensor:
    ids = torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    if ids.numel() == 0:
        raise SecateursError(f"text source {source_label!r} gives no tokens")
    return ids


def _check_counts(nsamples: int, seqlen: int) -> None:
    for label, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SecateursError(f"{label} must be a positive integer, got {value!r}")


def calibration_windows(source: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` token windows of ``seqlen`` tokens, a LongTensor of shape [nsamples, seqlen].

    * ``c4``: the Wanda / SparseGPT protocol on the first train shard, with ``random.Random(seed)``: pick a
      random document whose tokenisation (tokenizer defaults, as in the reference code) is longer than
      ``seqlen``, then a random window in it; repeat ``nsamples`` times.
    * every other source: tokenise the whole text once (no special tokens) and take ``nsamples`` windows at
      start offsets drawn uniformly with ``random.Random(seed)``; windows may overlap. The text must hold at
      least ``nsamples x seqlen`` tokens (and more than ``seqlen``).

    Deterministic for a given source, tokenizer and seed.
    """
    _check_counts(nsamples, seqlen)
    kind, name = resolve_source(source)
    rng = random.Random(seed)
    if kind == "hub" and name == "c4":
        return _c4_calibration(tokenizer, nsamples, seqlen, rng)
    ids = _tokens(str(source), tokenizer, read_text(source, "train"))
    total = ids.numel()
    need = max(nsamples * seqlen, seqlen + 1)
    if total < need:
        raise SecateursError(
            f"calibration text too short: {source!r} gives {total} tokens, need nsamples x seqlen = "
            f"{nsamples} x {seqlen} = {nsamples * seqlen}"
            + (f" (and more than seqlen = {seqlen})" if total <= seqlen else "")
            + "; use a longer text or fewer/shorter windows"
        )
    starts = torch.tensor([rng.randint(0, total - seqlen) for _ in range(nsamples)], dtype=torch.long)
    return ids[starts[:, None] + torch.arange(seqlen)]


def _c4_calibration(tokenizer, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    documents = _hub.load_documents("c4", "train")
    if not documents:
        raise SecateursError("hub source 'c4' train shard has no documents")
    lengths: dict[int, list[int]] = {}  # memo: document index -> token ids (the draw sequence is unchanged)
    windows = []
    for _ in range(nsamples):
        while True:
            index = rng.randint(0, len(documents) - 1)
            if index not in lengths:
                lengths[index] = _encode(tokenizer, documents[index], add_special_tokens=True)
            ids = lengths[index]
            if len(ids) > seqlen:
                break
            if len(lengths) == len(documents) and all(len(v) <= seqlen for v in lengths.values()):
                raise SecateursError(
                    f"calibration text too short: no C4 document is longer than seqlen = {seqlen} tokens"
                )
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def evaluation_tokens(source: str, tokenizer, split: str = "test") -> torch.Tensor:
    """The evaluation text tokenised once without special tokens: a 1-D LongTensor.

    * ``wikitext2``: the split's rows joined with "\\n\\n" (the paper protocol).
    * ``c4``: the first 1100 documents of the validation shard joined with " " (the SparseGPT protocol,
      which then keeps the first 256 windows of seqlen tokens; capping windows is the evaluator's job).
    * bundled corpora and local files: their whole text (``split`` is ignored).

    Cut it into non-overlapping windows of seqlen tokens, dropping the remainder, for perplexity.
    """
    kind, name = resolve_source(source)
    if kind == "hub" and name == "c4":
        documents = _hub.load_documents("c4", split)[:C4_EVAL_DOCUMENTS]
        text = check_nonempty(" ".join(documents), str(source))
    else:
        text = read_text(source, split)
    return _tokens(str(source), tokenizer, text)
