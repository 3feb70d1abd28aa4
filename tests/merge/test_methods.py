"""Averaging, task arithmetic, TIES and DARE + either on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from secateurs.errors import SecateursError
from secateurs.merge import (
    DARE,
    TIES,
    Average,
    TaskArithmetic,
    build_method,
    dare,
    disjoint_mean,
    elect,
    merge,
    task_arithmetic,
    task_vector,
    ties,
    trim,
)

T = torch.tensor

# three task vectors of one 5-entry tensor, and what TIES (k = 0.6: 3 of 5 kept per task) makes of them by hand
TAU = [
    {"w": T([4.0, -1.0, 0.5, -3.0, 2.0])},
    {"w": T([-2.0, 3.0, -0.2, 1.0, -6.0])},
    {"w": T([1.0, -5.0, 0.4, -0.5, 7.0])},
]
TRIMMED = [T([4.0, 0.0, 0.0, -3.0, 2.0]), T([-2.0, 3.0, 0.0, 0.0, -6.0]), T([1.0, -5.0, 0.0, 0.0, 7.0])]
# sums 3, -2, 0, -3, 3 -> signs +, -, (tie: majority), -, +
# agreeing means: (4 + 1)/2, -5, nothing, -3, (2 + 7)/2
MERGED = T([2.5, -5.0, 0.0, -3.0, 4.5])


def test_task_arithmetic_exact():
    base = {"w": T([1.0, 2.0, 3.0, 4.0, 5.0])}
    out = task_arithmetic(base, TAU, 0.5)
    assert torch.equal(out["w"], T([1.0 + 1.5, 2.0 - 1.5, 3.0 + 0.35, 4.0 - 1.25, 5.0 + 1.5]))
    assert torch.equal(merge(base, TAU, TaskArithmetic(lam=0.5))["w"], out["w"])


def test_average_is_the_mean_of_the_models():
    base = {"w": T([1.0, 2.0, 3.0, 4.0, 5.0])}
    models = [{"w": base["w"] + t["w"]} for t in TAU]
    vectors = [task_vector(base, m) for m in models]
    want = torch.stack([m["w"] for m in models]).mean(0)
    assert torch.allclose(merge(base, vectors, Average())["w"], want, atol=1e-6)


def test_ties_trim_elect_disjoint_mean_by_hand():
    trimmed = [trim(t, 0.6) for t in TAU]
    for got, want in zip(trimmed, TRIMMED, strict=True):
        assert torch.equal(got["w"], want)
    signs = elect(trimmed)
    assert torch.equal(signs["w"][[0, 1, 3, 4]], T([1.0, -1.0, -1.0, 1.0]))
    assert torch.equal(disjoint_mean(trimmed, signs)["w"], MERGED)
    base = {"w": torch.ones(5)}
    assert torch.equal(ties(base, TAU, k=0.6, lam=0.5)["w"], 1 + 0.5 * MERGED)
    assert torch.equal(merge(base, TAU, TIES(k=0.6, lam=0.5))["w"], 1 + 0.5 * MERGED)


def test_ties_sign_tie_takes_the_majority_sign():
    # entry 0: +2 and -2 cancel; the other entries' signs are +, +, - -> majority + -> entry 0 keeps the +2
    vectors = [{"w": T([2.0, 1.0, 1.0, -1.0])}, {"w": T([-2.0, 1.0, 1.0, -1.0])}]
    signs = elect(vectors)
    assert torch.equal(signs["w"], T([1.0, 1.0, 1.0, -1.0]))
    assert torch.equal(disjoint_mean(vectors, signs)["w"], T([2.0, 1.0, 1.0, -1.0]))


def test_ties_trim_over_the_model_or_per_tensor():
    vector = {"a": T([10.0, -9.0]), "b": T([1.0, -2.0])}
    model = trim(vector, 0.5)  # 2 of 4 over the whole vector: both of a
    assert torch.equal(model["a"], T([10.0, -9.0])) and torch.equal(model["b"], T([0.0, 0.0]))
    per = trim(vector, 0.5, scope="tensor")  # 1 of 2 in each tensor
    assert torch.equal(per["a"], T([10.0, 0.0])) and torch.equal(per["b"], T([0.0, -2.0]))
    assert torch.equal(trim(vector, 0.0)["a"], T([0.0, 0.0]))
    assert torch.equal(trim(vector, 1.0)["b"], vector["b"])


def test_dare_then_either_uses_each_tasks_own_masks():
    torch.manual_seed(0)
    base = {"w": torch.randn(50, 40), "b": torch.randn(40)}
    vectors = [{k: torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    config = DARE(drop=0.9, seed=5)
    dared = [dare(v, 0.9, 5, task=t) for t, v in enumerate(vectors)]
    ta = merge(base, vectors, TaskArithmetic(lam=0.3, dare=config))
    assert all(torch.equal(ta[k], task_arithmetic(base, dared, 0.3)[k]) for k in base)
    tm = merge(base, vectors, TIES(k=1.0, lam=0.7, dare=config))
    assert all(torch.equal(tm[k], ties(base, dared, 1.0, 0.7)[k]) for k in base)
    # DAREx-q with a q per task
    dx = merge(base, vectors, TaskArithmetic(lam=1.0, dare=DARE(0.9, "darex", None, 5)), qs=[0.2, 0.5, 1.0])
    dared = [dare(v, 0.9, 5, q, t) for t, (v, q) in enumerate(zip(vectors, [0.2, 0.5, 1.0], strict=True))]
    want = task_arithmetic(base, dared, 1.0)
    assert all(torch.equal(dx[k], want[k]) for k in base)


def test_merge_keeps_dtype_and_refuses_mismatch():
    base = {"w": torch.ones(3, dtype=torch.bfloat16)}
    out = merge(base, [{"w": torch.ones(3)}], TaskArithmetic(lam=1.0))
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"].float(), torch.full((3,), 2.0))
    with pytest.raises(SecateursError, match="w is \\[4\\] there, \\[3\\] in the base"):
        merge(base, [{"w": torch.ones(4)}], Average())
    with pytest.raises(SecateursError, match="has no tensor w"):
        merge(base, [{"v": torch.ones(3)}], Average())


def test_build_method_names_and_defaults():
    assert build_method("ties") == TIES(k=0.2, lam=1.0)
    assert build_method("dare-ties", dare=DARE()).k == 1.0
    assert build_method("dare-ta", 0.4, dare=DARE()).to_dict()["method"] == "dare-ta"
    for bad in (dict(name="dare-ta"), dict(name="ties", dare=DARE()), dict(name="average", lam=1.0), dict(name="x")):
        with pytest.raises(SecateursError):
            build_method(**bad)
