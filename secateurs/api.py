"""The public verbs: ``prune`` a model you hold (:mod:`secateurs.oneshot.prune`), ``evaluate`` its perplexity; for a
folder too big to load, ``evaluate_streamed`` and ``zero_shot_streamed`` (accuracy on lm-eval tasks), one decoder
layer at a time."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from secateurs import data
from secateurs.errors import SecateursError
from secateurs.evaluate import PerplexityResult, perplexity, wants_bos
from secateurs.evaluate.perplexity import eval_windows
from secateurs.models import check_seqlen, default_device
from secateurs.oneshot.prune import prune
from secateurs.oneshot.streamed_zeroshot import zero_shot_streamed

__all__ = ["default_eval_windows", "evaluate", "evaluate_streamed", "prune", "zero_shot_streamed"]

LOCAL_EVAL_WINDOWS = 40  # default cap for bundled and local text, so the embedded default runs in minutes
C4_EVAL_WINDOWS = 256  # the SparseGPT protocol for C4


def default_eval_windows(source: str) -> int | None:
    """All windows for wikitext2 (paper protocol), 256 for c4, 40 for bundled corpora and local files."""
    if data.source_kind(source) == "hub":
        return C4_EVAL_WINDOWS if data.describe_source(source).startswith("hub:allenai/c4") else None
    return LOCAL_EVAL_WINDOWS


def evaluate(
    model: nn.Module,
    tokenizer,
    source: str = "bible",
    *,
    seqlen: int = 512,
    max_windows: int | None | str = "auto",
    bos: bool | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``source`` with the paper protocol (see :mod:`secateurs.evaluate`).

    ``max_windows``: score at most this many windows; None for all; "auto" for :func:`default_eval_windows`.
    ``bos`` None means: BOS at the start of every window exactly when the tokenizer adds one by default.
    """
    windows, use_bos, available = _windows(model, tokenizer, source, seqlen, max_windows, bos)
    if device is not None:
        model.to(default_device(device))
    return perplexity(
        model, windows, bos=use_bos, source=data.describe_source(source), available_windows=available, progress=progress
    )


def evaluate_streamed(
    folder: str | Path,
    source: str = "bible",
    *,
    seqlen: int = 512,
    max_windows: int | None | str = "auto",
    bos: bool | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = "auto",
    progress: bool = True,
) -> PerplexityResult:
    """:func:`evaluate` for a model folder that need not fit in memory: its decoder layers are read one at a time
    from the safetensors shards (:func:`secateurs.oneshot.streaming.streamed_perplexity`); the same figure."""
    from secateurs.oneshot.streaming import Streamed, open_streamed, streamed_perplexity

    model, tokenizer, shards = open_streamed(folder, dtype)
    windows, use_bos, available = _windows(model, tokenizer, source, seqlen, max_windows, bos)
    return streamed_perplexity(
        model,
        Streamed(model, shards, None, write=False),
        windows,
        bos=use_bos,
        device=default_device(device),
        source=data.describe_source(source),
        available_windows=available,
        progress=progress,
    )


def _windows(model, tokenizer, source: str, seqlen: int, max_windows, bos: bool | None):
    """The evaluation windows of the protocol, whether BOS starts them, and how many the whole text holds."""
    if max_windows == "auto":
        max_windows = default_eval_windows(source)
    check_seqlen(model, seqlen)
    tokens = data.evaluation_tokens(source, tokenizer)
    use_bos = wants_bos(tokenizer) if bos is None else bos
    bos_id = tokenizer.bos_token_id if use_bos else None
    if use_bos and bos_id is None:
        raise SecateursError("BOS requested but the tokenizer has no BOS token")
    windows = eval_windows(tokens, seqlen, bos_id, max_windows)
    available = tokens.numel() // (seqlen - 1 if use_bos else seqlen)
    return windows, use_bos, available
