"""Calibration windows through a layer in batches: the statistics are the window-by-window sums, the result the
unbatched one; ``auto`` and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, tiny_model

import secateurs
from secateurs import Recipe
from secateurs.errors import SecateursError
from secateurs.oneshot.prune import choose_batch
from secateurs.oneshot.stage import GRAM, MEAN, STATISTICS, SUM_SQUARES, WINDOW_SQUARES
from secateurs.oneshot.stats import InputStats


def test_a_batch_adds_exactly_its_windows_one_by_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 9, 6, generator=g) * 3 + 1
    wanted = {SUM_SQUARES, GRAM, MEAN, WINDOW_SQUARES}
    one, batched, flat = InputStats(), InputStats(), InputStats()
    for w in x:
        one.add(w.unsqueeze(0), wanted)
    batched.add(x[:3], wanted, windows=3)
    batched.add(x[3:], wanted, windows=2)
    flat.add(x.reshape(-1, 6), wanted, windows=5)  # a layer that flattens its tokens before the linear
    for s in (batched, flat):
        assert (s.nsamples, s.ntokens) == (one.nsamples, one.ntokens) == (5, 45)
        for name in STATISTICS:
            assert torch.equal(getattr(s, name), getattr(one, name)), name
    with pytest.raises(ValueError, match="split"):
        InputStats().add(torch.randn(10, 6), wanted, windows=3)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_batched_prune_gives_the_unbatched_model(method):
    windows = torch.randint(0, VOCAB, (7, 24), generator=torch.Generator().manual_seed(0))
    a = tiny_model()
    b = copy.deepcopy(a)
    secateurs.prune(a, Recipe(method=method, sparsity=0.6, refine="dsnot"), windows, progress=False)
    report = secateurs.prune(
        b, Recipe(method=method, sparsity=0.6, refine="dsnot"), windows, progress=False, calibration_batch=3
    )
    assert report.calibration["batch"] == 3  # 7 windows: batches of 3, 3 and 1
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        # the same sums; a batched forward may round differently in the last bits on other machines
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_choose_batch():
    model = tiny_model()
    windows = torch.zeros(6, 16, dtype=torch.long)
    cpu = torch.device("cpu")
    assert choose_batch(1, model, windows, cpu) == 1
    assert choose_batch(4, model, windows, cpu) == 4
    assert choose_batch(50, model, windows, cpu) == 6  # at most every window
    assert 1 <= choose_batch("auto", model, windows, cpu) <= 6
    assert choose_batch("auto", model, None, cpu) == 1  # no calibration data
    for bad in (0, -2, "many", 1.5, True):
        with pytest.raises(SecateursError, match="positive integer or auto"):
            choose_batch(bad, model, windows, cpu)
    from test_moe import tiny_moe

    for family in ("mixtral", "qwen2_moe"):
        assert choose_batch(4, tiny_moe(family), windows, cpu) == 1, family  # routed tokens: not split by window


def test_cli_flag(tmp_path):
    from secateurs.cli import main

    with pytest.raises(SystemExit):
        main(["prune", "x", "--calibration-batch", "0"])
