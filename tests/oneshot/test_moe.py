"""Mixture-of-experts layers: each expert pruned as its own linears, on the tokens the router sends it.

Tiny random Mixtral, Qwen2-MoE (with a shared expert) and OLMoE models (transformers stores their experts as fused
3-D parameters), checked against quantities recomputed here by hand: the experts' output, the routing, the
statistics of each expert's inputs, the masks in the fused parameters.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TOKENIZER_VOCAB, byte_level_tokenizer, run_main
from torch import nn

import secateurs
from secateurs.errors import SecateursError
from secateurs.models import find_layers
from secateurs.oneshot import moe
from secateurs.oneshot.prune import check_recipe
from secateurs.oneshot.pruners.wanda import wanda_mask
from secateurs.oneshot.stage import GRAM, MEAN, SUM_SQUARES
from secateurs.oneshot.walk import dense_walk

VOCAB = 128
E, TOP_K, HIDDEN, INNER = 4, 2, 32, 48
COMMON = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=TOP_K,
    max_position_embeddings=128,
    initializer_range=0.1,  # routing and activations well away from ties (the default 0.02 makes them tiny)
    pad_token_id=0,
)
FAMILIES = {
    "mixtral": ("MixtralConfig", {"num_local_experts": E, "intermediate_size": INNER}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {"num_experts": E, "moe_intermediate_size": INNER, "shared_expert_intermediate_size": 64},
    ),
    "olmoe": ("OlmoeConfig", {"num_experts": E, "intermediate_size": INNER}),
}


def moe_config(family: str, vocab: int = VOCAB, **extra):
    name, kwargs = FAMILIES[family]
    settings = {"vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, **COMMON, **kwargs, **extra}
    return getattr(transformers, name)(**settings)


def tiny_moe(family: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(moe_config(family, **extra)).eval()


def experts_of(model) -> list[nn.Module]:
    return [layer.mlp.experts for layer in find_layers(model)[1]]


def expert_slices(experts, e: int) -> dict[str, torch.Tensor]:
    """Expert ``e``'s three matrices [out, in], cut from the fused parameters here (gate rows first)."""
    gate_up = experts.gate_up_proj[e]
    return {"gate_proj": gate_up[:INNER], "up_proj": gate_up[INNER:], "down_proj": experts.down_proj[e]}


def windows(n: int = 3, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def block_inputs(model, rows: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per decoder layer, per window: the tokens [T, H] entering its MoE block in a plain forward."""
    layers = find_layers(model)[1]
    seen = [[] for _ in layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda mod, args, i=i: seen[i].append(args[0].reshape(-1, HIDDEN)))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for row in rows:
            model(input_ids=row[None], use_cache=False)
    for hook in hooks:
        hook.remove()
    return seen


def routed_by_hand(router_weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[T, E] bool: the experts each token goes to: the top-k router logits (softmax keeps their order)."""
    chosen = (x.double() @ router_weight.double().t()).topk(TOP_K, dim=-1).indices
    return F.one_hot(chosen, E).sum(1).bool()


def never_to(expert: int):
    """A forward hook for a router: expert ``expert`` is never chosen (its logit is -inf), the rest as before."""

    def hook(module, args, out):
        logits = out[0].clone()
        logits[:, expert] = -torch.inf
        top, index = logits.float().softmax(-1).topk(TOP_K, dim=-1)
        return logits, (top / top.sum(-1, keepdim=True)).to(out[1].dtype), index

    return hook


# ---------------------------------------------------------------------------------------------- the forward
@pytest.mark.parametrize("family", list(FAMILIES))
def test_experts_computed_expert_by_expert_equal_the_fused_module(family):
    """The per-expert forward (the walk's) gives the fused module's output, and that output is the sum over each
    token's chosen experts of weight * down(silu(gate x) * up x), with gate the first half of gate_up_proj."""
    model = tiny_moe(family)
    block = model.model.layers[0].mlp
    x = torch.randn(40, HIDDEN)
    keys = set(model.state_dict())
    with torch.no_grad():
        _, weights, index = block.gate(x)
        fused = block.experts(x, index, weights)
        with moe.experts_as_linears(model):
            assert set(model.state_dict()) == keys  # the expert linears own no tensor
            per_expert = block.experts(x, index, weights)
    by_hand = torch.zeros(40, HIDDEN, dtype=torch.float64)
    for t in range(40):
        for k in range(TOP_K):
            W = {n: w.double() for n, w in expert_slices(block.experts, int(index[t, k])).items()}
            h = F.silu(W["gate_proj"] @ x[t].double()) * (W["up_proj"] @ x[t].double())
            by_hand[t] += weights[t, k].double() * (W["down_proj"] @ h)
    torch.testing.assert_close(per_expert, fused, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_expert.double(), by_hand, rtol=1e-5, atol=1e-6)
    # everything is put back
    assert "forward" not in block.experts.__dict__ and not list(block.experts.children())[1:]
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("kind", ["transposed, interleaved, bias", "no gate"])
def test_other_declared_layouts_computed_expert_by_expert(kind):
    """Fused experts stored [E, in, out] with interleaved gate/up rows and biases (GPT-OSS), or without a gate
    (Nemotron-H): the per-expert linears view the right slices and reproduce transformers' own forward."""
    if kind == "no gate":
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts as cls

        config = transformers.NemotronHConfig(hidden_size=HIDDEN, moe_intermediate_size=INNER, n_routed_experts=E)
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls

        config = transformers.GptOssConfig(hidden_size=HIDDEN, intermediate_size=INNER, num_local_experts=E)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    holder = nn.Module()
    holder.experts = experts = cls(config)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.2)
    linears = moe.layer_linears(holder)
    names = ["down_proj", "up_proj"] if kind == "no gate" else ["down_proj", "gate_proj", "up_proj"]
    assert sorted(linears) == sorted(f"experts.{e}.{n}" for e in range(E) for n in names)
    if kind != "no gate":  # interleaved: gate = even output columns of [E, H, 2I], up = odd ones
        assert torch.equal(linears["experts.2.gate_proj"].weight, experts.gate_up_proj[2][:, 0::2].t())
        assert torch.equal(linears["experts.2.up_proj"].bias, experts.gate_up_proj_bias[2][1::2])
        assert torch.equal(linears["experts.2.down_proj"].weight, experts.down_proj[2].t())
    x = torch.randn(30, HIDDEN)
    index = torch.stack([torch.randperm(E)[:TOP_K] for _ in range(30)])
    weights = torch.rand(30, TOP_K)
    with torch.no_grad():
        reference = experts(x, index, weights)
        with moe.experts_as_linears(holder):
            per_expert = experts(x, index, weights)
    torch.testing.assert_close(per_expert, reference, rtol=1e-6, atol=1e-6)


def test_expert_linears_are_views_of_the_fused_parameters():
    model = tiny_moe("mixtral")
    experts = experts_of(model)[1]
    linears = moe.layer_linears(model.model.layers[1])
    assert "mlp.gate" not in linears  # the router is not a linear to prune
    up = linears["mlp.experts.2.up_proj"]
    assert isinstance(up, nn.Linear) and (up.out_features, up.in_features) == (INNER, HIDDEN)
    with torch.no_grad():
        up.weight[5, 7] = 0.0  # what pruning does to it
    assert experts.gate_up_proj[2, INNER + 5, 7] == 0
    assert (experts.gate_up_proj[2] == 0).sum() == 1


# ------------------------------------------------------------------------------------------- the statistics
def hand_stats(x: torch.Tensor) -> dict:
    x = x.double()
    return {"ntokens": len(x), "sq_norm": (x * x).sum(0), "x_sum": x.sum(0), "H_sum": x.t() @ x}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_each_expert_sees_exactly_the_tokens_routed_to_it(family):
    """The walk's sums for expert e's linears equal sums computed here over the tokens whose top-k router logits
    include e (gate and up: the block's input; down: silu(gate x) * up x); windows count when e got a token."""
    model = tiny_moe(family)
    rows = windows()
    got = dense_walk(
        model, rows, torch.device("cpu"), lambda i, w, s: s, wanted=frozenset({SUM_SQUARES, GRAM, MEAN}), progress=False
    )
    inputs = block_inputs(model, rows)
    for index, layer in enumerate(find_layers(model)[1]):
        stats = got[index]
        for e in range(E):
            W = expert_slices(layer.mlp.experts, e)
            per_window = [x[routed_by_hand(layer.mlp.gate.weight, x)[:, e]] for x in inputs[index]]
            assert all(len(x) for x in per_window)  # every expert is routed to here
            x = torch.cat(per_window)
            down_in = F.silu(x @ W["gate_proj"].t()) * (x @ W["up_proj"].t())
            for name, expected in (
                ("gate_proj", hand_stats(x)),
                ("up_proj", hand_stats(x)),
                ("down_proj", hand_stats(down_in)),
            ):
                s = stats[f"mlp.experts.{e}.{name}"]
                assert s.ntokens == expected["ntokens"] and s.nsamples == len(rows), (index, e, name)
                for key in ("sq_norm", "x_sum", "H_sum"):
                    torch.testing.assert_close(getattr(s, key).double(), expected[key], rtol=1e-4, atol=1e-4)
        assert stats["mlp.experts.0.gate_proj"] is stats["mlp.experts.0.up_proj"]  # one input, one set of sums
    assert sum(s.ntokens for s in (got[0][f"mlp.experts.{e}.down_proj"] for e in range(E))) == rows.numel() * TOP_K


# ----------------------------------------------------------------------------------------------- the pruning
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_wanda_prunes_every_expert_per_row_and_leaves_the_router_dense(family):
    model = tiny_moe(family)
    dense = copy.deepcopy(model)
    rows = windows()
    first_inputs = block_inputs(model, rows)[0]
    report = secateurs.prune(model, secateurs.Recipe(method="wanda", sparsity=0.5), rows, device="cpu", progress=False)
    masks = report.masks
    names = {lin["name"] for lin in report.linears}
    layers_d = find_layers(dense)[1]
    for index, layer in enumerate(find_layers(model)[1]):
        assert torch.equal(layer.mlp.gate.weight, layers_d[index].mlp.gate.weight)  # the router stays dense
        if family == "qwen2_moe":
            assert torch.equal(layer.mlp.shared_expert_gate.weight, layers_d[index].mlp.shared_expert_gate.weight)
            assert f"model.layers.{index}.mlp.shared_expert_gate" not in names
            shared = layer.mlp.shared_expert.down_proj.weight
            assert ((shared == 0).sum(1) == shared.shape[1] // 2).all()  # the shared expert is pruned as a MLP
        for e in range(E):
            for name, W in expert_slices(layer.mlp.experts, e).items():
                full = f"model.layers.{index}.mlp.experts.{e}.{name}"
                W0 = expert_slices(layers_d[index].mlp.experts, e)[name]
                assert ((W == 0).sum(1) == W.shape[1] // 2).all(), full  # exactly floor(cols * s) in every row
                assert torch.equal(masks[full].unpack(), W == 0)
                assert torch.equal(W[W != 0], W0[W != 0])
                if index == 0:  # layer 0 sees the embeddings, as here: its masks come from the routed tokens only
                    x = torch.cat([x[routed_by_hand(layer.mlp.gate.weight, x)[:, e]] for x in first_inputs])
                    if name == "down_proj":
                        Wd = expert_slices(layers_d[0].mlp.experts, e)
                        x = F.silu(x @ Wd["gate_proj"].t()) * (x @ Wd["up_proj"].t())
                    assert torch.equal(W == 0, wanda_mask(W0, (x * x).sum(0), len(rows), 0.5)), full
    assert names >= {f"model.layers.1.mlp.experts.{e}.{n}" for e in range(E) for n in ("gate_proj", "down_proj")}
    with torch.no_grad():
        logits = model(input_ids=rows[:1]).logits
    assert torch.isfinite(logits).all()
    assert report.sparsity == pytest.approx(0.5)


def test_nm_pattern_in_every_expert():
    model = tiny_moe("olmoe")
    secateurs.prune(model, secateurs.Recipe(method="sparsegpt", pattern="2:4"), windows(), device="cpu", progress=False)
    for experts in experts_of(model):
        for e in range(E):
            for name, W in expert_slices(experts, e).items():
                zeros = (W.reshape(W.shape[0], -1, 4) == 0).sum(-1)
                assert (zeros == 2).all(), (e, name)


@pytest.mark.parametrize(
    "policy, method, allocation", [("dense", "wanda", "uniform"), ("magnitude", "sparsegpt", "owl")]
)
def test_an_expert_without_tokens_follows_the_policy_and_is_reported(policy, method, allocation, caplog):
    model = tiny_moe("mixtral")
    for layer in find_layers(model)[1]:
        layer.mlp.gate.register_forward_hook(never_to(3))
    dense = copy.deepcopy(model)
    recipe = secateurs.Recipe(method=method, sparsity=0.5, allocation=allocation, unrouted_experts=policy)
    with caplog.at_level(logging.WARNING):
        report = secateurs.prune(model, recipe, windows(), device="cpu", progress=False)
    assert "2 experts got no calibration token" in caplog.text
    assert ("left dense" if policy == "dense" else "pruned by magnitude") in caplog.text
    results = {lin["name"]: lin for lin in report.linears}
    for index, (experts, experts_d) in enumerate(zip(experts_of(model), experts_of(dense), strict=True)):
        for e in range(E):
            for name, W in expert_slices(experts, e).items():
                result = results[f"model.layers.{index}.mlp.experts.{e}.{name}"]
                W0 = expert_slices(experts_d, e)[name]
                if e != 3:
                    assert "unrouted" not in result["info"]
                    assert (W == 0).sum() == int(W.numel() * result["sparsity_target"])
                    continue
                assert result["info"] == {"unrouted": True, "policy": policy}
                if policy == "dense":
                    assert torch.equal(W, W0) and result["pruned"] == 0
                else:  # one |W| threshold for the matrix, to the layer's target
                    k = int(W.numel() * result["sparsity_target"])
                    assert k > 0 and result["pruned"] == k
                    assert torch.equal(W == 0, W0.abs() <= W0.abs().flatten().sort().values[k - 1])
                    assert torch.equal(W[W != 0], W0[W != 0])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=windows(1)).logits).all()


def test_sweep_snapshot_puts_the_experts_back():
    """Between the cells of a sweep the dense weights come back, the fused experts' included."""
    from secateurs.sweep import restore_linears, snapshot_linears

    model = tiny_moe("olmoe")
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved = snapshot_linears(model)
    assert "model.layers.1.mlp.experts.3.down_proj" in saved
    secateurs.prune(model, "wanda", windows(), device="cpu", progress=False)
    assert not torch.equal(experts_of(model)[1].down_proj, dense["model.layers.1.mlp.experts.down_proj"])
    restore_linears(model, saved)
    assert all(torch.equal(p, dense[n]) for n, p in model.named_parameters())


def test_resume_restores_the_experts(tmp_path):
    """The finished layers a stopped run saved (expert linears included) are put back into the fused parameters."""
    model, fresh = tiny_moe("qwen2_moe"), tiny_moe("qwen2_moe")
    recipe = secateurs.Recipe(method="wanda", sparsity=0.5)
    first = secateurs.prune(model, recipe, windows(), device="cpu", progress=False, checkpoint=tmp_path / "run")
    again = secateurs.prune(
        fresh, recipe, windows(), device="cpu", progress=False, checkpoint=tmp_path / "run", resume=True
    )
    for experts, restored in zip(experts_of(model), experts_of(fresh), strict=True):
        assert torch.equal(experts.gate_up_proj, restored.gate_up_proj)
        assert torch.equal(experts.down_proj, restored.down_proj)
    assert [lin["mask_sha256"] for lin in first.linears] == [lin["mask_sha256"] for lin in again.linears]


# --------------------------------------------------------------------------------------- refusals and checks
class Undeclared(nn.Module):
    """Fused experts that do not say how they are laid out."""

    def __init__(self):
        super().__init__()
        self.num_experts = E
        self.w = nn.Parameter(torch.zeros(E, INNER, HIDDEN))


def test_an_undeclared_fused_layout_is_refused_not_skipped():
    holder = nn.Module()
    holder.mlp = nn.Module()
    holder.mlp.experts = Undeclared()
    with pytest.raises(SecateursError, match="Undeclared .* does not declare its layout"):
        moe.layer_linears(holder)


def test_experts_computing_something_else_are_refused_and_the_model_put_back():
    model = tiny_moe("mixtral")
    experts = experts_of(model)[0]
    original = type(experts)

    class Unweighted(original):  # the same layout, but the routing weights are never applied
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return super().forward(hidden_states, top_k_index, torch.ones_like(top_k_weights))

    experts.__class__ = Unweighted
    with pytest.raises(SecateursError, match="do not give the module's own output"):
        secateurs.prune(model, "wanda", windows(), device="cpu", progress=False)
    assert "forward" not in experts.__dict__ and [n for n, _ in experts.named_children()] == ["act_fn"]


def test_nm_widths_of_the_experts_are_checked_before_any_forward():
    model = tiny_moe("qwen2_moe", moe_intermediate_size=50)
    with pytest.raises(SecateursError, match=r"model\.layers\.0\.mlp\.experts\.0\.down_proj has 50"):
        check_recipe(model, secateurs.Recipe(pattern="2:4"))


def test_unrouted_policy_round_trips_and_is_checked(tmp_path):
    recipe = secateurs.Recipe(method="sparsegpt", unrouted_experts="magnitude")
    back = secateurs.Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert back == recipe and back.to_dict()["unrouted_experts"] == "magnitude"
    recipe.save(tmp_path / "r.yaml")
    assert secateurs.Recipe.load(tmp_path / "r.yaml").unrouted_experts == "magnitude"
    assert secateurs.Recipe.from_dict({"method": "wanda"}).unrouted_experts == "dense"  # older reports
    with pytest.raises(SecateursError, match="unrouted_experts must be one of dense, magnitude"):
        secateurs.Recipe(unrouted_experts="prune")


# ------------------------------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def tiny_mixtral_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-mixtral"
    torch.manual_seed(0)
    config = moe_config("mixtral", vocab=TOKENIZER_VOCAB, bos_token_id=256, eos_token_id=257)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("save_format", ["hf", "sparse"])
def test_cli_prune_saves_the_experts_sparse(save_format, tiny_mixtral_dir, tmp_path, caplog):
    """`secateurs prune` on a saved MoE folder: the output loads back (both formats) with every expert's rows at
    the reported sparsity, and its masks name each expert's linears."""
    out = tmp_path / "out"
    code, stdout, stderr = run_main(
        "prune", tiny_mixtral_dir, "--method", "wanda", "--sparsity", "0.5", "--calibration", "shakespeare",
        "--nsamples", "4", "--seqlen", "32", "--eval", "none", "--unrouted-experts", "magnitude",
        "--save-format", save_format, "--output", out, "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["recipe"]["unrouted_experts"] == "magnitude"
    assert ("4 fused MoE expert tensors" in caplog.text) == (save_format == "sparse")  # stored dense, and said
    reported = {lin["name"]: lin for layer in report["layers"] for lin in layer["linears"]}
    if save_format == "hf":
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
    else:
        model = secateurs.checkpoint.load_pruned(out)[0]
    masks = secateurs.checkpoint.load_masks(out)
    for index, experts in enumerate(experts_of(model)):
        for e in range(E):
            for name, W in expert_slices(experts, e).items():
                full = f"model.layers.{index}.mlp.experts.{e}.{name}"
                assert ((W == 0).sum(1) == W.shape[1] // 2).all(), full
                assert reported[full]["zeros"] == int((W == 0).sum())
                assert torch.equal(masks[full], W == 0)
