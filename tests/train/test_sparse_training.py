"""The maths of sparse training on small cases: ERK by hand, schedules, drop/grow against brute force, SR-STE's
gradient, pruned weights that stay zero, resume = uninterrupted, and the bad-input errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.oneshot.select import NM
from secateurs.train import GMP, SET, SRSTE, KernelRigL, RigL, SparseTraining, Static, method_from, schedules
from secateurs.train import masks as M
from secateurs.train.methods.srste import sr_ste


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 16, generator=g), torch.randint(0, 4, (12,), generator=g)) for _ in range(n)]


def train(model, opt, sparse, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sparse.step()


# ---- ERK and schedules, by hand
def test_erk_densities_by_hand():
    shapes = {"a": (10, 10), "b": (10, 40)}
    # raw scores: a = 20/100 = 0.2, b = 50/400 = 0.125; weighted mean must be 0.5 over 500 weights
    d = M.erk_densities(shapes, 0.5)
    eps = 250 / (0.2 * 100 + 0.125 * 400)
    assert d["a"] == pytest.approx(0.2 * eps) and d["b"] == pytest.approx(0.125 * eps)
    assert (d["a"] * 100 + d["b"] * 400) / 500 == pytest.approx(0.5)


def test_erk_makes_overfull_layers_dense_and_rescales():
    shapes = {"small": (2, 2), "big": (100, 100)}
    d = M.erk_densities(shapes, 0.5)
    assert d["small"] == 1.0  # its raw density would exceed 1
    assert d["big"] == pytest.approx((0.5 * 10004 - 4) / 10000)
    conv = M.erk_densities({"c": (8, 4, 3, 3), "l": (10, 32)}, 0.2)
    raw_c, raw_l = (8 + 4 + 3 + 3) / 288, 42 / 320
    assert conv["c"] / conv["l"] == pytest.approx(raw_c / raw_l)


def test_cubic_schedule_values():
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 with s_i 0, s_f 0.9, t0 10, end 110
    assert schedules.cubic_sparsity(10, 0.0, 0.9, 10, 110) == 0.0
    assert schedules.cubic_sparsity(60, 0.0, 0.9, 10, 110) == pytest.approx(0.9 - 0.9 * 0.5**3)
    assert schedules.cubic_sparsity(35, 0.0, 0.9, 10, 110) == pytest.approx(0.9 * (1 - 0.75**3))
    assert schedules.cubic_sparsity(500, 0.0, 0.9, 10, 110) == 0.9


def test_cosine_fraction_and_interval():
    assert schedules.cosine_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert schedules.cosine_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert schedules.cosine_fraction(100, 0.3, 100) == 0.0
    assert [t for t in range(1, 40) if schedules.on_interval(t, 10, 0, 30)] == [10, 20, 30]


# ---- selections against brute force
def test_drop_and_grow_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        keep = M.random_mask((4, 5), 0.5, g)
        drop, grow = torch.rand(4, 5, generator=g), torch.rand(4, 5, generator=g)
        k = 3
        new, dropped, grown = M.drop_and_grow(keep, drop, grow, k)
        active = [i for i in range(20) if keep.view(-1)[i]]
        want_drop = sorted(active, key=lambda i: drop.view(-1)[i])[:k]
        candidates = [i for i in range(20) if not keep.view(-1)[i] or i in want_drop]
        want_grow = sorted(candidates, key=lambda i: -grow.view(-1)[i])[:k]
        want = set(active) - set(want_drop) | set(want_grow)
        assert set(new.view(-1).nonzero().view(-1).tolist()) == want
        assert int(new.sum()) == int(keep.sum())
        assert set(dropped.view(-1).nonzero().view(-1).tolist()) == set(want_drop) - set(want_grow)
        assert set(grown.view(-1).nonzero().view(-1).tolist()) == set(want_grow) - set(want_drop)


def test_nm_keep_groups_along_inputs():
    W = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.1, -0.2, 9.0]])
    keep = M.nm_keep(W, NM(2, 4))
    assert keep.tolist() == [[False, True, True, False, True, False, False, True]]
    conv = torch.randn(4, 8, 3, 3)
    k = M.nm_keep(conv, NM(2, 4))
    groups = k.permute(0, 2, 3, 1).reshape(-1, 4)
    assert (groups.sum(1) == 2).all()
    brute = conv.abs().permute(0, 2, 3, 1).reshape(-1, 4)
    kept_min = torch.where(groups, brute, torch.inf).min(1).values
    dropped_max = torch.where(~groups, brute, -torch.inf).max(1).values
    assert (kept_min >= dropped_max).all()


def test_rigl_grows_largest_gradients_and_drops_smallest_weights():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]))
    model = nn.Sequential(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    keep = torch.tensor([[True, True, False, True], [False, True, True, True]])
    sparse = SparseTraining(
        model, opt, RigL(alpha=0.6, interval=1, end=1.0), masks={"0": ~keep}, total_steps=4, distribution="uniform"
    )
    # fraction at step 1: 0.3 (1 + cos(pi/4)) * 6 active -> round(3.07) = 3 drops: the weights 1, 2, 4 (smallest)
    grad = torch.tensor([[0.0, 0.0, 9.0, 0.0], [8.0, 1.0, 0.0, 7.0]])
    layer.weight.grad = grad.clone()
    opt.step()
    sparse.step()
    new = layer.sparse_keep
    # inactive after the drop: (0,0)=1,(0,1)=2,(0,2),(0,3)=4,(1,0); largest |grad| there: (0,2)=9, (1,0)=8, then 0s
    # by position: (0,0)
    assert new.tolist() == [[True, False, True, False], [True, True, True, True]]
    assert layer.weight[0, 2] == 0 and layer.weight[1, 0] == 0  # grown start at zero
    assert layer.weight[0, 0] == 1.0  # dropped and regrown: keeps its value
    assert int(new.sum()) == 6


# ---- pruned weights stay pruned
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    ],
)
@pytest.mark.parametrize("method", [Static(), SET(interval=5), RigL(interval=5), GMP(interval=5)])
def test_pruned_weights_stay_exactly_zero(make_opt, method):
    model = mlp()
    opt = make_opt(model.parameters())
    sparse = SparseTraining(model, opt, method, sparsity=0.8, total_steps=60)
    data = batches(60)
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for name, m in sparse.layers.items():  # before the guard re-applies the masks: the optimizer did it
            assert (m.weight[~m.sparse_keep] == 0).all(), name
            for value in opt.state[m.weight].values():
                if isinstance(value, torch.Tensor) and value.shape == m.weight.shape:
                    assert (value[~m.sparse_keep] == 0).all(), name
        sparse.step()
    assert sparse.overall_sparsity() >= 0.8 - 1e-3
    for name, m in sparse.layers.items():
        assert int(m.sparse_keep.sum()) == M.kept_count(m.weight.numel(), sparse.densities[name])


def test_dynamic_methods_change_masks_and_keep_counts():
    for method in (SET(interval=5), RigL(interval=5)):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sparse = SparseTraining(model, opt, method, sparsity=0.7, total_steps=40, distribution="uniform")
        before = {n: m.sparse_keep.clone() for n, m in sparse.layers.items()}
        train(model, opt, sparse, batches(40))
        assert len(sparse.history) == 5  # steps 5..30 below T_end = 30 (exclusive)
        assert any((before[n] != m.sparse_keep).any() for n, m in sparse.layers.items())
        for n, m in sparse.layers.items():
            assert int(m.sparse_keep.sum()) == int(before[n].sum())


def test_gmp_follows_the_cubic_schedule():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sparse = SparseTraining(
        model, opt, GMP(interval=10, end=0.5), sparsity=0.9, total_steps=100, distribution="uniform"
    )
    assert sparse.overall_sparsity() == 0.0
    data = batches(100)
    for i, (x, y) in enumerate(data, 1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sparse.step()
        if i in (10, 30, 50, 80):
            want = schedules.cubic_sparsity(i, 0.0, 0.9, 0, 50)
            for _name, m in sparse.layers.items():
                assert int((~m.sparse_keep).sum()) == m.weight.numel() - M.kept_count(m.weight.numel(), 1 - want)


def test_kernel_granularity_prunes_whole_kernels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = SparseTraining(model, opt, KernelRigL(interval=2), sparsity=0.8, total_steps=10, distribution="uniform")
    assert sparse.layers["0"].sparse_keep.shape == (8, 4, 1, 1)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        opt.zero_grad()
        model(torch.randn(2, 4, 9, 9, generator=g)).square().mean().backward()
        opt.step()
        sparse.step()
    assert sparse.history
    for _name, m in sparse.layers.items():
        zero_kernels = (m.weight.flatten(2) == 0).all(dim=2)
        inactive = ~m.sparse_keep.view(zero_kernels.shape)
        assert zero_kernels[inactive].all()  # every inactive kernel is zero, whole
        assert int(inactive.sum()) == inactive.numel() - M.kept_count(inactive.numel(), 0.2)


# ---- SR-STE
def test_sr_ste_gradient_is_straight_through_plus_decay():
    W = torch.tensor([[1.0, -4.0, 3.0, 2.0], [0.5, 0.1, -0.2, 9.0]], requires_grad=True)
    out = sr_ste(W, NM(2, 4), 0.1)
    keep = torch.tensor([[False, True, True, False], [True, False, False, True]])
    assert torch.equal(out, W.detach() * keep)
    g = torch.arange(8.0).view(2, 4)
    out.backward(g)
    assert torch.allclose(W.grad, g + 0.1 * (~keep) * W.detach())


def test_sr_ste_training_ends_exactly_n_of_m():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = SparseTraining(model, opt, SRSTE(), pattern="2:4", exclude=["4"])
    train(model, opt, sparse, batches(20))
    masks = sparse.keep_masks()
    sparse.finalize()
    for name in ("0", "2"):
        W = model.get_submodule(name).weight
        assert isinstance(W, nn.Parameter)
        groups = (W != 0).view(W.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all() and torch.equal(W != 0, masks[name] & (W != 0))


# ---- resume
@pytest.mark.parametrize("method", [RigL(interval=3), SET(interval=3), GMP(interval=3)])
def test_resume_equals_uninterrupted_run(method):
    data = batches(24)

    def fresh():
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        return model, opt, SparseTraining(model, opt, method, sparsity=0.75, total_steps=24, seed=3)

    model, opt, sparse = fresh()
    train(model, opt, sparse, data)
    model2, opt2, sparse2 = fresh()
    train(model2, opt2, sparse2, data[:10])
    saved = copy.deepcopy((model2.state_dict(), opt2.state_dict(), sparse2.state_dict()))
    model3, opt3, sparse3 = fresh()
    model3.load_state_dict(saved[0])
    opt3.load_state_dict(saved[1])
    sparse3.load_state_dict(saved[2])
    train(model3, opt3, sparse3, data[10:])
    for (k, a), b in zip(model.state_dict().items(), model3.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert sparse.history == sparse3.history


# ---- bad input
def test_bad_input_is_one_clear_error():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SecateursError, match="matches no Linear or Conv"):
        SparseTraining(model, opt, targets=["*conv*"])
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(SecateursError, match=r"\[0, 1\)"):
            SparseTraining(mlp(), opt, sparsity=bad)
    with pytest.raises(SecateursError, match="divisible by 3"):
        SparseTraining(mlp(), opt, Static(), pattern="1:3")
    with pytest.raises(SecateursError, match="needs total_steps"):
        SparseTraining(mlp(), opt, RigL())
    with pytest.raises(SecateursError, match="N:M pattern"):
        SparseTraining(mlp(), opt, SRSTE())
    with pytest.raises(SecateursError, match="does not train N:M"):
        SparseTraining(mlp(), opt, RigL(), pattern="2:4", total_steps=3)
    with pytest.raises(SecateursError, match="unknown setting"):
        method_from({"name": "rigl", "alfa": 0.3})
    with pytest.raises(SecateursError, match="unknown training method"):
        method_from("rigle")
    with pytest.raises(SecateursError, match="alpha must be"):
        RigL(alpha=1.5)
    other = nn.Sequential(nn.Linear(16, 30), nn.ReLU(), nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 4))
    state = SparseTraining(other, None, sparsity=0.5).state_dict()
    with pytest.raises(SecateursError, match="another model"):
        SparseTraining(mlp(), None, sparsity=0.5).load_state_dict(state)
    with pytest.raises(SecateursError, match="has shape"):
        SparseTraining(mlp(), None, masks={n: torch.zeros(3, 3, dtype=torch.bool) for n in ("0", "2", "4")})


def test_static_magnitude_and_random_masks():
    model = mlp()
    W0 = model[0].weight.detach().clone()
    sparse = SparseTraining(model, None, Static(init="magnitude"), sparsity=0.5, distribution="uniform")
    kept = W0[sparse.layers["0"].sparse_keep].abs()
    dropped = W0[~sparse.layers["0"].sparse_keep].abs()
    assert kept.min() >= dropped.max()
    a = SparseTraining(mlp(), None, Static(), sparsity=0.5, seed=1).state_dict()["masks"]
    b = SparseTraining(mlp(), None, Static(), sparsity=0.5, seed=1).state_dict()["masks"]
    c = SparseTraining(mlp(), None, Static(), sparsity=0.5, seed=2).state_dict()["masks"]
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], c[k]) for k in a)


def test_erk_mean_density_over_the_model():
    model = mlp()
    sparse = SparseTraining(model, None, Static(), sparsity=0.9)
    total = sum(m.weight.numel() for m in sparse.layers.values())
    assert sparse.overall_sparsity() == pytest.approx(0.9, abs=2 / total + 1e-3)
    assert len(set(sparse.densities.values())) > 1


@pytest.mark.parametrize("method", [RigL(interval=2), SRSTE()])
def test_bf16_autocast(method):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    kw = {"pattern": "2:4", "exclude": ["4"]} if method.straight_through else {"sparsity": 0.8, "total_steps": 8}
    sparse = SparseTraining(model, opt, method, **kw)
    for x, y in batches(8):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sparse.step()
    sparse.finalize()
    assert (model[0].weight == 0).float().mean() >= 0.5


def test_torch_compile():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = SparseTraining(model, opt, RigL(interval=2), sparsity=0.8, total_steps=8)
    compiled = torch.compile(model)
    for x, y in batches(8):
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()
        sparse.step()
    assert len(sparse.history) == 2  # steps 2 and 4, before T_end = 6
    for m in sparse.layers.values():
        assert (m.weight[~m.sparse_keep] == 0).all()


def test_rest_draws_conflicting_samples_upweight_times_as_often():
    from secateurs.train import REST

    conflicting = torch.zeros(1000, dtype=torch.bool)
    conflicting[:10] = True  # 1% conflicting
    method = REST(upweight=80.0)
    w = method.sample_weights(conflicting)
    assert w[:10].eq(80).all() and w[10:].eq(1).all()
    draws = torch.tensor(list(method.sampler(conflicting, torch.Generator().manual_seed(0), 200_000)))
    share = (draws < 10).double().mean().item()
    assert share == pytest.approx(800 / (800 + 990), abs=0.01)  # 80*10 / (80*10 + 990)
    assert method.grows_by_gradient and method_from("rest").alpha == 0.5


@pytest.mark.parametrize("largest", [True, False])
def test_selection_equals_a_stable_sort_with_ties(largest):
    g = torch.Generator().manual_seed(3)
    for trial in range(40):
        n = int(torch.randint(1, 60, (1,), generator=g))
        flat = torch.randint(0, 5, (n,), generator=g).float()  # many ties
        if trial % 3 == 0:
            flat[torch.rand(n, generator=g) < 0.3] = math.inf if not largest else -math.inf
        k = int(torch.randint(0, n + 2, (1,), generator=g))
        order = torch.argsort(-flat if largest else flat, stable=True)[:k]
        want = torch.zeros(n, dtype=torch.bool)
        want[order] = True
        assert torch.equal(M._select(flat, k, largest), want), (flat, k)
