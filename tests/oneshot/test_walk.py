"""The generic sequential walk, on tiny models of many families."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, VOCAB, tiny_model

import secateurs
from secateurs.models import find_layers, find_linears, weight_view


def _layer_inputs(model, windows):
    """Hidden states entering each decoder layer during a normal forward, per window."""
    _, layers = find_layers(model)
    seen = [[] for _ in layers]
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen[i].append((args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for row in windows:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_walk_feeds_each_layer_what_the_pruned_model_would(family, method):
    """Inputs seen by layer i during the walk equal its inputs in a forward of the final pruned model.

    This holds only if every keyword argument (masks, rotary embeddings, sliding windows ...) was replayed
    faithfully, layer by layer; seqlen 24 exceeds the tiny models' sliding windows.
    """
    model = tiny_model(family)
    windows = torch.randint(0, VOCAB, (3, 24))
    _, layers = find_layers(model)
    walked = [[] for _ in layers]
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: walked[i].append((args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    recipe = secateurs.Recipe(method=method, sparsity=0.5)
    report = secateurs.prune(model, recipe, windows, device="cpu", progress=False)  # the forward below is on CPU
    for h in hooks:
        h.remove()
    expected = _layer_inputs(model, windows)
    for i in range(len(layers)):
        # after the capture pass (pass-through), each layer runs twice per window in the walk (statistics,
        # then the sparse recompute) with the same inputs
        assert len(walked[i]) == 3 * len(windows)
        walked[i] = walked[i][len(windows) :]
        for j in range(len(windows)):
            torch.testing.assert_close(walked[i][j], expected[i][j], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(walked[i][len(windows) + j], expected[i][j], rtol=1e-4, atol=1e-5)
    assert report.sparsity == pytest.approx(0.5, abs=1e-9)
    assert all(layer["output_error"] > 0 for layer in report.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_and_head_never_pruned(family):
    model = tiny_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    head_before = model.get_output_embeddings().weight.detach().clone()
    embed_before = model.get_input_embeddings().weight.detach().clone()
    report = secateurs.prune(model, "wanda", torch.randint(0, VOCAB, (2, 16)), progress=False)
    layers_name, layers = find_layers(model)
    pruned_weights = {f"{layers_name}.{i}.{n}.weight" for i, layer in enumerate(layers) for n in find_linears(layer)}
    assert {lin["name"] + ".weight" for lin in report.linears} == pruned_weights
    for name, param in model.named_parameters():
        if name not in pruned_weights:
            assert torch.equal(param, before[name]), f"{name} changed"
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    assert torch.equal(model.get_input_embeddings().weight, embed_before)


def test_magnitude_needs_no_calibration_and_thresholds_per_matrix():
    model = tiny_model("llama")
    original = {n: weight_view(m).clone() for n, m in find_linears(find_layers(model)[1][0]).items()}
    report = secateurs.prune(model, secateurs.Recipe(method="magnitude", sparsity=0.3), None, progress=False)
    assert report.calibration is None
    for name, module in find_linears(find_layers(model)[1][0]).items():
        W0 = original[name]
        W = weight_view(module)
        k = int(W0.numel() * 0.3)
        threshold = W0.abs().flatten().sort().values[k - 1]
        assert torch.equal(W == 0, W0.abs() <= threshold)


def _decoder_linears(model) -> dict:
    """Every nn.Linear inside the decoder layers, by full name (found here, not by the library)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def _assert_no_prior_zeros(model):
    for name, m in _decoder_linears(model).items():
        assert (m.weight != 0).all(), f"{name} has zeros before pruning: counts below would prove nothing"


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_pattern_every_group(method, pattern):
    """Exactly N zeros (not at least N) in every group of M consecutive inputs of every row, from the weights."""
    n, m = map(int, pattern.split(":"))
    model = tiny_model("qwen2")
    _assert_no_prior_zeros(model)
    dense = {name: lin.weight.detach().clone() for name, lin in _decoder_linears(model).items()}
    secateurs.prune(
        model, secateurs.Recipe(method=method, pattern=pattern), torch.randint(0, VOCAB, (2, 16)), progress=False
    )
    linears = _decoder_linears(model)
    assert len(linears) == 2 * 7
    for name, module in linears.items():
        W = module.weight
        zeros = (W.reshape(W.shape[0], -1, m) == 0).sum(-1)
        assert (zeros == n).all(), (name, zeros.min().item(), zeros.max().item())
        if method != "sparsegpt":  # the kept weights are the dense ones, untouched
            kept = W != 0
            assert torch.equal(W[kept], dense[name][kept])
        else:  # SparseGPT updates the kept weights to absorb the error
            assert not torch.equal(W[W != 0], dense[name][W != 0])


@pytest.mark.parametrize("sparsity", [0.45, 0.7])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_counts_are_exact(method, sparsity):
    """Counted from the weights: Wanda floor(cols * s) per row, magnitude floor(numel * s) and SparseGPT
    floor(rows * cols * s) per matrix (SparseGPT and magnitude do not compare within rows)."""
    model = tiny_model("llama")
    _assert_no_prior_zeros(model)
    report = secateurs.prune(
        model, secateurs.Recipe(method=method, sparsity=sparsity), torch.randint(0, VOCAB, (2, 16)), progress=False
    )
    by_name = {lin["name"]: lin for lin in report.linears}
    linears = _decoder_linears(model)
    assert set(by_name) == set(linears) and len(linears) == 3 * 7
    row_counts = set()
    for name, module in linears.items():
        W = module.weight
        rows, cols = W.shape
        zeros = int((W == 0).sum())
        assert torch.isfinite(W).all()
        if method == "wanda":
            assert ((W == 0).sum(1) == int(cols * sparsity)).all(), name
        else:
            assert zeros == int(rows * cols * sparsity), name
            row_counts |= set((W == 0).sum(1).tolist())
        assert by_name[name]["zeros"] == zeros and by_name[name]["pruned"] == zeros
    if method != "wanda":
        assert len(row_counts) > 1  # a per-matrix choice: rows lose different numbers of weights


def test_wanda_picks_the_lowest_scores_from_dense_activations():
    """Layer 0 sees the dense model's activations: its mask is the lowest |W| * sqrt(mean ||X_j||^2) per row,
    computed here from hooks on a dense forward pass."""
    windows = torch.randint(0, VOCAB, (3, 16))
    dense = tiny_model("llama")
    first = {n: m for n, m in dense.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    sq = {}

    def accumulate(name, x):
        sq[name] = sq.get(name, 0) + (x.double().reshape(-1, x.shape[-1]) ** 2).sum(0)

    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: accumulate(n, a[0])) for n, m in first.items()]
    with torch.no_grad():
        for row in windows:
            dense(input_ids=row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    model = tiny_model("llama")
    secateurs.prune(model, secateurs.Recipe(method="wanda", sparsity=0.5), windows, progress=False)
    pruned = {n: m for n, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    for name, m in first.items():
        scores = m.weight.detach().double().abs() * torch.sqrt(sq[name] / len(windows))
        k = m.weight.shape[1] // 2
        expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.argsort(1)[:, :k], True)
        assert torch.equal(pruned[name].weight == 0, expected), name


def _layer0_outputs(model, windows):
    out = []
    hook = model.model.layers[0].register_forward_hook(
        lambda mod, a, o: out.append((o[0] if isinstance(o, tuple) else o).detach().double().clone())
    )
    with torch.no_grad():
        for row in windows:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    hook.remove()
    return out


def test_sparsegpt_reconstructs_layer_outputs_better_than_wanda():
    """Layer 0's relative output error, recomputed here against the dense model (its inputs are the embeddings,
    untouched by pruning): SparseGPT < Wanda < magnitude at 60%, and the report's output_error equals it."""
    windows = torch.randint(0, VOCAB, (4, 16))
    reference = _layer0_outputs(tiny_model("llama"), windows)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = tiny_model("llama")
        report = secateurs.prune(model, secateurs.Recipe(method=method, sparsity=0.6), windows, progress=False)
        outputs = _layer0_outputs(model, windows)
        num = sum(float((o - r).pow(2).sum()) for o, r in zip(outputs, reference, strict=True))
        den = sum(float(r.pow(2).sum()) for r in reference)
        errors[method] = num / den
        if method == "magnitude":  # pruned without calibration data: nothing measured
            assert report.layers[0]["output_error"] is None
        else:
            assert report.layers[0]["output_error"] == pytest.approx(errors[method], rel=1e-3)
    assert 0 < errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_exclude_leaves_linears_dense():
    model = tiny_model("llama")
    report = secateurs.prune(
        model,
        secateurs.Recipe(sparsity=0.5, exclude=["*.mlp.down_proj"]),
        torch.randint(0, VOCAB, (2, 16)),
        progress=False,
    )
    assert not any(lin["name"].endswith("down_proj") for lin in report.linears)
    for layer in find_layers(model)[1]:
        assert torch.count_nonzero(layer.mlp.down_proj.weight) == layer.mlp.down_proj.weight.numel()


def test_nm_width_not_divisible_is_a_clear_error():
    model = tiny_model("llama")  # every input width is 64 or 96 (hidden 64, intermediate 96)
    windows = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(secateurs.SecateursError, match=r"divisible by 5, and no prunable linear has one \(every"):
        secateurs.prune(model, secateurs.Recipe(pattern="2:5"), windows, progress=False)
    # 1:64 fits the 64-wide inputs, not the 96-wide down_proj: those are named (and counted), nothing is pruned
    with pytest.raises(secateurs.SecateursError, match=r"down_proj has 96 \(and 2 more linears: .*down_proj"):
        secateurs.prune(model, secateurs.Recipe(pattern="1:64"), windows, progress=False)
    assert all(int((p == 0).sum()) == 0 for n, p in model.named_parameters() if "proj" in n)


def test_report_counts_and_per_linear_sparsity():
    model = tiny_model("opt")
    report = secateurs.prune(
        model, secateurs.Recipe(method="wanda", sparsity=0.7), torch.randint(0, VOCAB, (2, 16)), progress=False
    )
    data = report.to_dict()
    assert data["recipe"]["method"] == "wanda"
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert {lin["name"] for lin in report.linears} == set(weights)
    for lin in report.linears:
        rows, cols = lin["shape"]
        W = weights[lin["name"]]
        assert tuple(W.shape) == (rows, cols) and lin["numel"] == W.numel()
        assert ((W == 0).sum(1) == int(cols * 0.7)).all()  # counted from the weights, every row
        assert lin["pruned"] == lin["zeros"] == int((W == 0).sum()) == rows * int(cols * 0.7)
    assert report.sparsity == pytest.approx(
        sum(int((W == 0).sum()) for W in weights.values()) / sum(W.numel() for W in weights.values())
    )
    assert report.prune_seconds > 0 and report.peak_rss_bytes > 0
    assert data["versions"]["torch"]


def test_linears_fed_the_same_input_share_statistics():
    from secateurs.oneshot.stats import InputStats, StatsCollector

    model = tiny_model("llama")
    layer = find_layers(model)[1][0]
    linears = find_linears(layer)
    inputs = {n: [] for n in linears}
    probes = [
        m.register_forward_pre_hook(lambda mod, a, n=n: inputs[n].append(a[0].clone())) for n, m in linears.items()
    ]
    stats = {n: InputStats() for n in linears}
    collector = StatsCollector(stats, {"sq_norm", "H_sum"})
    hooks = [m.register_forward_hook(collector.hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, VOCAB, (1, 12)))
            collector.next_window()
    for h in hooks + probes:
        h.remove()
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
    assert stats["mlp.down_proj"] is not stats["mlp.up_proj"]
    assert all(s.sq_norm.dtype == s.H_sum.dtype == torch.float64 for s in stats.values())  # until all are in
    for name, seen in inputs.items():
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])
        assert stats[name].nsamples == 3
        stats[name].finish()
        torch.testing.assert_close(stats[name].sq_norm, (X**2).sum(0))
        torch.testing.assert_close(stats[name].H_sum, X.t() @ X)


def test_windows_longer_than_the_model_allows_are_refused():
    model = tiny_model("gpt2")  # 128 positions
    with pytest.raises(secateurs.SecateursError, match="exceeds the model's maximum of 128"):
        secateurs.prune(model, "wanda", torch.randint(0, VOCAB, (1, 200)), progress=False)


def test_a_model_in_training_mode_is_pruned_without_dropout():
    windows = torch.randint(0, VOCAB, (2, 16))
    reports = []
    for _ in range(2):
        model = tiny_model("gpt2")  # GPT-2 has dropout 0.1 by default
        model.train()
        reports.append(secateurs.prune(model, "sparsegpt", windows, progress=False))
        assert model.training  # left as it was
    assert [layer["output_error"] for layer in reports[0].layers] == [
        layer["output_error"] for layer in reports[1].layers
    ]


@pytest.mark.parametrize("refine", [None, "dsnot"])
@pytest.mark.parametrize("pattern", [None, "2:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_on_cpu(dtype, method, pattern, refine):
    """bf16 / fp16 models pruned on the CPU: exact counts from the weights, dtype kept, finite weights and logits."""
    model = tiny_model("llama").to(dtype)
    _assert_no_prior_zeros(model)
    windows = torch.randint(0, VOCAB, (2, 16))
    dsnot = secateurs.DSnoT(threshold=0.0) if refine else None
    recipe = secateurs.Recipe(method=method, sparsity=0.5, pattern=pattern, refine=dsnot)
    report = secateurs.prune(model, recipe, windows, device="cpu", progress=False)
    linears = _decoder_linears(model)
    assert len(linears) == 3 * 7 and {lin["name"] for lin in report.linears} == set(linears)
    for name, module in linears.items():
        W = module.weight
        assert W.dtype == dtype, name
        assert torch.isfinite(W).all(), name
        rows, cols = W.shape
        if pattern:
            assert ((W.reshape(rows, -1, 4) == 0).sum(-1) == 2).all(), name
        elif method == "wanda":
            assert ((W == 0).sum(1) == cols // 2).all(), name
        else:
            assert int((W == 0).sum()) == rows * cols // 2, name
    assert all(p.dtype == dtype for p in model.parameters())
    if refine:  # layer 0 sees the same inputs with or without DSnoT: same counts per row, other zeros
        plain = tiny_model("llama").to(dtype)
        plain_recipe = secateurs.Recipe(method=method, sparsity=0.5, pattern=pattern)
        secateurs.prune(plain, plain_recipe, windows, device="cpu", progress=False)  # as the run it is compared with
        moved = 0
        for name, module in _decoder_linears(plain).items():
            if name.startswith("model.layers.0."):
                W, W_plain = linears[name].weight, module.weight
                assert torch.equal((W == 0).sum(1), (W_plain == 0).sum(1)), name
                moved += int(((W == 0) & (W_plain != 0)).sum())
        assert moved > 0
        assert sum(lin["info"]["dsnot"]["swaps"] for lin in report.linears) > 0
    with torch.no_grad():
        logits = model(windows).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_capture_stops_after_the_last_decoder_layer():
    """Recording the layers' inputs never runs the LM head (the forward pass stops after the last layer's call)."""
    from secateurs.oneshot.capture import capture

    model = tiny_model("llama")
    heads = []
    model.lm_head.register_forward_hook(lambda *a: heads.append(1))
    inputs, calls = capture(model, torch.randint(0, VOCAB, (3, 12)), torch.device("cpu"), progress=False)
    assert heads == [] and len(inputs) == 3 and all(len(per_layer) == 3 for per_layer in calls)
    model(torch.randint(0, VOCAB, (1, 4)))  # the model is whole again afterwards
    assert heads == [1]


def test_parking_moves_hidden_states_only_when_offloading_from_a_gpu():
    from secateurs.oneshot.walk import Parking

    h = torch.ones(2, 3)
    cpu = Parking(torch.device("cpu"), offload=True)  # nothing to offload from
    assert not cpu.offload and cpu.park(h) is h and cpu.fetch(h) is h
    assert Parking(torch.device("cuda"), offload=True).offload and not Parking(torch.device("cuda")).offload
