"""DARE and DAREx-q on small cases whose answers are known, and the delta folder round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.merge import (
    DARE,
    add,
    choose_q,
    dare,
    drop,
    float_tensors,
    keep_mask,
    load_delta,
    make_delta,
    output_change,
    q_grid,
    save_delta,
    task_vector,
)
from secateurs.merge.delta import DELTA_WEIGHTS, fingerprint, tensor_seed

_INT = {2: torch.int16, 4: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT[t.element_size()])


def test_dare_keeps_the_expected_fraction():
    n, p = 200_000, 0.9
    kept = int(keep_mask((n,), p, seed=3).sum())
    mean, sd = n * (1 - p), math.sqrt(n * p * (1 - p))  # Binomial(n, 1 - p)
    assert abs(kept - mean) < 5 * sd, (kept, mean, sd)
    # drop() zeroes exactly the entries the mask drops
    v = {"w": torch.randn(400, 500)}
    dropped = drop(v, p, seed=3)
    assert int((dropped["w"] != 0).sum()) == int(keep_mask((400, 500), p, tensor_seed(3, "w")).sum())


def test_dare_rescales_survivors_by_one_over_one_minus_p():
    v = {"w": torch.randn(64, 32), "b": torch.randn(32)}
    p = 0.75
    out = dare(v, p, seed=1)
    for name, t in v.items():
        keep = keep_mask(t.shape, p, tensor_seed(1, name))
        assert torch.equal(out[name][keep], t[keep] / (1 - p))
        assert torch.equal(out[name][~keep], torch.zeros(int((~keep).sum())))
    # p = 0 keeps everything unchanged
    assert torch.equal(dare(v, 0.0, seed=1)["w"], v["w"])


def test_dare_is_unbiased():
    """E[dare(tau)] = tau: the mean over N seeds is within 5 standard errors, from Var = tau^2 p / (1 - p)."""
    torch.manual_seed(0)
    tau = {"w": torch.randn(40)}
    p, n = 0.8, 3000
    total = torch.zeros(40, dtype=torch.float64)
    for seed in range(n):
        total += dare(tau, p, seed=seed)["w"].double()
    mean = total / n
    std_error = (tau["w"].double().abs() * math.sqrt(p / (1 - p))) / math.sqrt(n)
    z = (mean - tau["w"].double()).abs() / std_error
    assert float(z.max()) < 5, z
    # and the z-scores look standard normal as a whole (mean of z^2 near 1)
    assert 0.5 < float((z**2).mean()) < 1.6


def test_fixed_seed_fixed_mask():
    v = {"a": torch.randn(30, 30), "b": torch.randn(30, 30)}
    first, again = dare(v, 0.9, seed=7), dare(v, 0.9, seed=7)
    assert all(torch.equal(first[k], again[k]) for k in v)
    assert not torch.equal(dare(v, 0.9, seed=8)["a"], first["a"])
    # a tensor's mask depends on the seed and its name only, not on the other tensors
    assert torch.equal(dare({"a": v["a"]}, 0.9, seed=7)["a"], first["a"])
    # another task draws other masks
    assert not torch.equal(dare(v, 0.9, seed=7, task=1)["a"], first["a"])


def test_dare_config_is_checked():
    for bad in (dict(drop=1.0), dict(drop=-0.1), dict(rescale="x"), dict(q=0.5), dict(rescale="darex", q=1.5)):
        with pytest.raises(SecateursError):
            DARE(**bad)


def test_darex_q_grid_and_choice():
    grid = q_grid(0.99, 5)
    assert grid[0] == pytest.approx(0.01) and grid[-1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(grid, grid[1:], strict=False))
    q, table = choose_q(lambda q: (q - grid[2]) ** 2, grid)
    assert q == grid[2] and [row["q"] for row in table] == grid


def test_darex_output_change_measures_the_logit_change():
    """On a linear model the change at q is mean |x (tau - dropped / q)^T| exactly."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4, bias=False)
    base = {"weight": torch.zeros(4, 6)}
    finetuned = {"weight": torch.randn(4, 6)}
    dropped = drop(task_vector(base, finetuned), 0.5, seed=0)
    x = torch.randn(10, 6)
    change = output_change(model, base, finetuned, dropped, [x])
    for q in (0.5, 0.8):
        want = (x @ (finetuned["weight"] - dropped["weight"] / q).T).abs().mean()
        assert change(q) == pytest.approx(float(want), rel=1e-5)


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(128, 64), nn.LayerNorm(64))


def test_delta_round_trips_bit_exactly_and_applies(tmp_path):
    base_model = _toy_model()
    base = float_tensors(base_model)
    finetuned = {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
    vector = task_vector(base, finetuned)
    kept = keep_mask(vector["2.weight"].shape, 0.9, tensor_seed(4, "2.weight")).nonzero()[0]
    vector["2.weight"][tuple(kept)] = -0.0  # a -0.0 that survives the drop must come back as -0.0
    config = DARE(drop=0.9, seed=4)
    delta = make_delta(base, vector, config)
    assert torch.equal(delta.tensors["2.weight"], dare(vector, 0.9, 4)["2.weight"])
    sizes = save_delta(delta, tmp_path / "delta", {"kind": "delta"})
    back = load_delta(tmp_path / "delta")
    assert back.tensors.keys() == delta.tensors.keys()
    for name, t in delta.tensors.items():
        assert back.tensors[name].shape == t.shape and torch.equal(bits(back.tensors[name]), bits(t)), name
    assert torch.signbit(back.tensors["2.weight"][tuple(kept)]) and back.tensors["2.weight"][tuple(kept)] == 0
    assert back.base_sha256 == fingerprint(base) and back.recipe["q"] == pytest.approx(0.1)
    applied = back.apply(base)
    want = add(base, dare(vector, 0.9, 4))
    assert all(torch.equal(applied[k], want[k]) for k in base)
    # the weights are packed; the file is smaller than the delta stored dense
    assert sizes["packed_tensors"] >= 3 and sizes["delta_file_bytes"] < sizes["dense_delta_bytes"]
    assert sizes["nnz"] == sum(int((bits(t) != 0).sum()) for t in delta.tensors.values())  # -0.0 is stored
    report = json.loads((tmp_path / "delta" / "report.json").read_text())
    assert report["bytes"]["delta_file_bytes"] == (tmp_path / "delta" / DELTA_WEIGHTS).stat().st_size


def test_delta_refuses_another_base_and_damage(tmp_path):
    base = float_tensors(_toy_model())
    finetuned = {k: v + 0.01 for k, v in base.items()}
    delta = make_delta(base, task_vector(base, finetuned), DARE(drop=0.5))
    save_delta(delta, tmp_path / "d")
    other = {k: v + 1 for k, v in base.items()}
    with pytest.raises(SecateursError, match="another base"):
        load_delta(tmp_path / "d").apply(other)
    with pytest.raises(SecateursError, match="no tensor 2.bias"):
        load_delta(tmp_path / "d").apply({k: v for k, v in base.items() if k != "2.bias"})
    path = tmp_path / "d" / DELTA_WEIGHTS
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SecateursError):
        load_delta(tmp_path / "d")


def test_bfloat16_delta_is_stored_in_bfloat16(tmp_path):
    base = {k: v.to(torch.bfloat16) for k, v in float_tensors(_toy_model()).items()}
    finetuned = {k: v + 0.5 for k, v in base.items()}
    delta = make_delta(base, task_vector(base, finetuned), DARE(drop=0.9))
    assert all(t.dtype == torch.bfloat16 for t in delta.tensors.values())
    save_delta(delta, tmp_path / "d")
    back = load_delta(tmp_path / "d")
    assert all(torch.equal(bits(back.tensors[k]), bits(t)) for k, t in delta.tensors.items())
