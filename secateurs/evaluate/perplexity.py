"""Perplexity with the protocol of the pruning papers.

The evaluation text is tokenised once; it is cut into non-overlapping windows of ``seqlen`` tokens (the
remainder dropped), each scored alone with batch 1; the loss is over the seqlen-1 shifted targets of each
window and perplexity = exp(mean NLL). For tokenizers that start every sequence with BOS (Gemma, LLaMA ...),
each window is BOS followed by seqlen-1 text tokens: such models score far worse without it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from secateurs.errors import SecateursError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    windows: int
    seqlen: int
    bos: bool
    tokens_scored: int
    source: str = ""
    available_windows: int | None = None  # windows the whole text holds, when only the first ones were scored

    @property
    def protocol(self) -> str:
        bos = "BOS + seqlen-1 text tokens per window" if self.bos else "no BOS"
        of = f"first {self.windows} of {self.available_windows}" if self.available_windows else str(self.windows)
        return (
            f"{self.source or 'text'}: {of} non-overlapping windows of {self.seqlen} tokens ({bos}), "
            f"batch 1, loss over the {self.seqlen - 1} shifted targets, ppl = exp(mean NLL)"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "protocol": self.protocol}


def wants_bos(tokenizer) -> bool:
    """True if the tokenizer puts BOS in front of every encoded text by default."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return len(ids) > 0 and ids[0] == bos


def eval_windows(
    tokens: torch.Tensor, seqlen: int, bos_token_id: int | None = None, max_windows: int | None = None
) -> torch.Tensor:
    """Cut a 1-D token stream into [windows, seqlen] non-overlapping windows (BOS first if given)."""
    if seqlen < 2:
        raise SecateursError(f"seqlen must be at least 2, got {seqlen}")
    step = seqlen - 1 if bos_token_id is not None else seqlen
    count = tokens.numel() // step
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise SecateursError(f"evaluation text too short: {tokens.numel()} tokens, need at least {step}")
    windows = tokens[: count * step].reshape(count, step)
    if bos_token_id is not None:
        windows = torch.cat([torch.full((count, 1), bos_token_id, dtype=windows.dtype), windows], dim=1)
    return windows


@torch.no_grad()
def perplexity(
    model,
    windows: torch.Tensor,
    *,
    bos: bool = False,
    device: torch.device | str | None = None,
    source: str = "",
    available_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` over evaluation windows [n, seqlen] (see :func:`eval_windows`)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total = 0.0
    was_training = model.training
    model.eval()
    for row in tqdm(windows, desc="perplexity", disable=not progress, leave=False):
        total += window_nll(model, row, device)
    model.train(was_training)
    return perplexity_result(total, windows, bos, source, available_windows)


def window_nll(model, row: torch.Tensor, device: torch.device) -> float:
    """Mean NLL of one window [seqlen] over its seqlen-1 shifted targets (batch 1)."""
    ids = row.unsqueeze(0).to(device)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def perplexity_result(
    total_nll: float, windows: torch.Tensor, bos: bool, source: str, available_windows: int | None
) -> PerplexityResult:
    """The result of the protocol from the sum over ``windows`` of their mean NLLs."""
    n, seqlen = windows.shape
    nll = total_nll / n
    if available_windows == n:
        available_windows = None
    return PerplexityResult(math.exp(nll), nll, n, seqlen, bos, n * (seqlen - 1), source, available_windows)
