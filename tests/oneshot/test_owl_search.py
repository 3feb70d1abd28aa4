"""OWL with auto settings: the candidates, the held-out choice against a brute-force restatement, the real run
after it, the recipe and command-line spellings, and the refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model

import secateurs
from secateurs.errors import SecateursError
from secateurs.oneshot.allocations.owl import LAMBDAS, MS, OWL
from secateurs.oneshot.recipe import Recipe
from secateurs.oneshot.search import split_holdout
from secateurs.oneshot.stage import number_or_auto


def _windows(n=8, seqlen=24, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _heldout_ppl(model, held):
    with torch.no_grad():
        nll = []
        for row in held:
            logits = model(input_ids=row.unsqueeze(0), use_cache=False).logits[0, :-1]
            nll.append(F.cross_entropy(logits, row[1:]).item())
    return math.exp(sum(nll) / len(nll))


def test_candidates_put_uniform_first():
    assert OWL(lam="auto").candidates() == [(5.0, 0.0)] + [(5.0, lam) for lam in LAMBDAS if lam > 0]
    both = OWL(lam="auto", m="auto").candidates()
    assert both[0][1] == 0.0 and len(both) == 1 + len(MS) * (len(LAMBDAS) - 1)
    assert OWL(m="auto", lam=0.1).candidates() == [(m, 0.1) for m in MS]
    assert not OWL().searching and OWL(lam="auto").searching
    with pytest.raises(SecateursError, match="auto"):
        OWL(lam="auto").allocate(0.5, ["a"], [{"outlier_ratio": 0.1}])


def test_holdout_split():
    w = _windows(8)
    calib, held = split_holdout(w, 0.25)
    assert torch.equal(calib, w[:6]) and torch.equal(held, w[6:])
    calib, held = split_holdout(w[:2], 0.9)  # at least one window on each side
    assert len(calib) == 1 and len(held) == 1
    with pytest.raises(SecateursError, match="at least 2"):
        split_holdout(w[:1], 0.25)


def test_auto_in_recipes_and_on_the_command_line():
    recipe = Recipe(method="wanda", sparsity=0.6, allocation={"name": "owl", "lam": "auto", "m": "auto"})
    again = Recipe.from_dict(recipe.to_dict())
    assert again.allocation.lam == "auto" and again.allocation.m == "auto"
    assert Recipe.from_dict({**recipe.to_dict(), "options": {"allocation": {"lam": 0.05}}}).allocation.lam == 0.05
    with pytest.raises(SecateursError, match="number or auto"):
        Recipe.from_dict({"allocation": "owl", "options": {"allocation": {"lam": "best"}}})
    assert number_or_auto("AUTO") == "auto" and number_or_auto("0.1") == 0.1
    from secateurs.cli import main

    with pytest.raises(SystemExit):
        main(["prune", "x", "--owl-lambda", "best"])


def test_search_chooses_the_lowest_heldout_perplexity_then_prunes_with_it_on_every_window():
    windows = _windows(8)
    calib, held = windows[:6], windows[6:]
    dense = tiny_model()
    recipe = Recipe(method="wanda", sparsity=0.6, allocation=OWL(lam="auto", m=3.0))

    # brute force: each candidate pruned on the calibration part, scored on the held-out part
    want = {}
    for m, lam in OWL(lam="auto", m=3.0).candidates():
        model = copy.deepcopy(dense)
        alloc = "uniform" if lam == 0 else OWL(m=m, lam=lam)
        secateurs.prune(model, Recipe(method="wanda", sparsity=0.6, allocation=alloc), calib, progress=False)
        want[lam] = _heldout_ppl(model, held)
    best = min(want, key=want.get)

    model = copy.deepcopy(dense)
    report = secateurs.prune(model, recipe, windows, progress=False)
    search = report.allocation_search
    got = {row["lam"]: row["heldout_ppl"] for row in search["candidates"]}
    assert got.keys() == want.keys()
    for lam in want:
        assert got[lam] == pytest.approx(want[lam], rel=1e-4)
    assert search["chosen"] == {"m": 3.0, "lam": best}
    assert search["calibration_windows"] == 6 and search["heldout_windows"] == 2
    assert report.recipe["options"]["allocation"]["lam"] == "auto"  # the report reruns the search

    # the run itself: the chosen settings on all 8 windows, from the dense weights (the search put them back)
    direct = copy.deepcopy(dense)
    secateurs.prune(
        direct, Recipe(method="wanda", sparsity=0.6, allocation=OWL(m=3.0, lam=best)), windows, progress=False
    )
    for (name, a), (_, b) in zip(model.named_parameters(), direct.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_search_skips_candidates_that_do_not_fit_the_target():
    """At 95% a wide lambda would push a layer past 100%: it is reported as skipped, not an error."""
    model = tiny_model()
    report = secateurs.prune(
        model, Recipe(method="magnitude", sparsity=0.95, allocation=OWL(lam="auto")), _windows(4), progress=False
    )
    rows = report.allocation_search["candidates"]
    assert any("skipped" in r for r in rows) and any("heldout_ppl" in r for r in rows)


def test_search_refuses_streaming_and_one_window():
    from secateurs.oneshot.prune import _check_search
    from secateurs.oneshot.walk import InMemory

    _check_search(None, secateurs.oneshot.distributed.Ranks.current())
    _check_search(InMemory(), secateurs.oneshot.distributed.Ranks.current())

    class Elsewhere(InMemory):
        pass

    with pytest.raises(SecateursError, match="low-memory"):
        _check_search(Elsewhere(), secateurs.oneshot.distributed.Ranks.current())
    with pytest.raises(SecateursError, match="at least 2"):
        secateurs.prune(tiny_model(), Recipe(allocation=OWL(lam="auto")), _windows(1), progress=False)


def test_when_uniform_wins_the_run_is_uniform_without_owls_dense_pass(monkeypatch):
    """lambda = 0 chosen: every layer gets the target, and the dense pass that would measure outliers is skipped."""
    from dataclasses import replace

    import secateurs.oneshot.prune as prune_module

    def chose_uniform(model, owl, *args, **kwargs):
        return replace(owl, lam=0.0, m=5.0), {"chosen": {"m": 5.0, "lam": 0.0}, "candidates": []}

    passes = []
    real_dense_walk = prune_module.dense_walk
    monkeypatch.setattr(prune_module, "search_owl", chose_uniform)
    monkeypatch.setattr(prune_module, "dense_walk", lambda *a, **k: passes.append(1) or real_dense_walk(*a, **k))
    windows, dense = _windows(4), tiny_model()
    model = copy.deepcopy(dense)
    report = secateurs.prune(model, Recipe(method="wanda", sparsity=0.6, allocation=OWL(lam="auto")), windows,
                             progress=False)  # fmt: skip
    assert passes == []
    assert [layer["sparsity_target"] for layer in report.layers] == [0.6] * len(report.layers)
    direct = copy.deepcopy(dense)
    secateurs.prune(direct, Recipe(method="wanda", sparsity=0.6), windows, progress=False)
    for (name, a), (_, b) in zip(model.named_parameters(), direct.named_parameters(), strict=True):
        assert torch.equal(a, b), name
