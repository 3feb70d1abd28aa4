"""The perplexity protocol: windows, BOS, loss over shifted targets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model

from secateurs.errors import SecateursError
from secateurs.evaluate.perplexity import eval_windows, perplexity


def test_windows_are_non_overlapping_and_drop_the_remainder():
    tokens = torch.arange(23)
    windows = eval_windows(tokens, 5)
    assert windows.tolist() == [list(range(i, i + 5)) for i in range(0, 20, 5)]
    assert eval_windows(tokens, 5, max_windows=2).shape == (2, 5)


def test_bos_windows_carry_seqlen_minus_one_text_tokens():
    windows = eval_windows(torch.arange(10, 20), 4, bos_token_id=1)
    assert windows.tolist() == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18]]


def test_too_short_text_is_an_error():
    with pytest.raises(SecateursError, match="too short"):
        eval_windows(torch.arange(3), 8)


def test_perplexity_is_exp_of_mean_shifted_nll():
    model = tiny_model("llama")
    windows = torch.randint(0, VOCAB, (3, 12))
    nll = []
    with torch.no_grad():
        for row in windows:
            logits = model(row.unsqueeze(0)).logits[0, :-1]
            nll.append(F.cross_entropy(logits, row[1:]).item())
    result = perplexity(model, windows, progress=False)
    assert result.perplexity == pytest.approx(math.exp(sum(nll) / 3), rel=1e-5)
    assert result.tokens_scored == 3 * 11
    assert "3 non-overlapping windows of 12 tokens" in result.protocol
