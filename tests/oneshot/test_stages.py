"""The stage design: recipes chain typed stages, the engine collects what they declare, masks come back."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import VOCAB, run_main, tiny_model

import secateurs
from secateurs.cli import build_parser
from secateurs.cli.stages import recipe_from_args
from secateurs.errors import SecateursError
from secateurs.oneshot import registry
from secateurs.oneshot.recipe import Recipe
from secateurs.oneshot.select import per_row
from secateurs.oneshot.stage import MEAN, Pruner, StageOutput


def chained() -> Recipe:
    return Recipe(
        method=secateurs.SparseGPT(blocksize=64, percdamp=0.02),
        sparsity=0.6,
        allocation=secateurs.OWL(m=4.0, lam=0.05),
        refine=secateurs.DSnoT(cycles=7, targets=("*.mlp.*",)),
        update="sparsegpt",
        exclude=["*.o_proj"],
    )


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_recipe_round_trips_through_json_and_yaml(tmp_path, suffix):
    recipe = chained()
    path = tmp_path / f"recipe{suffix}"
    recipe.save(path)
    back = Recipe.load(path)
    assert back == recipe
    assert back.to_dict() == recipe.to_dict()
    assert back.method.blocksize == 64 and back.refine.targets == ("*.mlp.*",) and back.allocation.lam == 0.05
    assert [s.name for s in back.stages()] == ["owl", "sparsegpt", "dsnot", "sparsegpt"]
    assert [s.kind for s in back.stages()] == ["allocation", "pruner", "refiner", "update"]


def test_recipe_stage_as_a_dict_and_legacy_flat_reports():
    assert Recipe.from_dict({"method": {"name": "sparsegpt", "blocksize": 32}}).method == secateurs.SparseGPT(32)
    legacy = {  # report.json of the flat recipe: every option present, only the chosen stages' ones matter
        "method": "wanda",
        "sparsity": 0.7,
        "pattern": None,
        "exclude": [],
        "blocksize": 128,
        "percdamp": 0.01,
        "allocation": "owl",
        "owl_m": 3.0,
        "owl_lambda": 0.1,
        "refine": "dsnot",
        "dsnot_cycles": 9,
        "dsnot_threshold": 0.0,
        "dsnot_power": 1.0,
        "dsnot_targets": [],
    }
    recipe = Recipe.from_dict(legacy)
    assert recipe.method == secateurs.Wanda()
    assert recipe.allocation == secateurs.OWL(m=3.0, lam=0.1)
    assert recipe.refine == secateurs.DSnoT(cycles=9, threshold=0.0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"method": "pruneit"}, "unknown method 'pruneit': choose one of magnitude, wanda, sparsegpt"),
        ({"refine": "grow"}, "unknown refinement 'grow'"),
        ({"update": "lbfgs"}, "unknown weight update 'lbfgs'"),
        ({"allocation": "zigzag"}, "unknown allocation 'zigzag'"),
        ({"options": {"method": {"blocksize": 0}}, "method": "sparsegpt"}, "sparsegpt: blocksize must be positive"),
        ({"options": {"method": {"block": 3}}, "method": "sparsegpt"}, "unknown setting(s) for sparsegpt: block"),
        ({"colour": "red"}, "unknown recipe field(s): colour"),
        ({"method": secateurs.DSnoT()}, "dsnot is a refiner, not a pruner"),
        ({"method": "sparsegpt", "options": {"method": {"blocksize": "abc"}}}, "setting blocksize must be an integer"),
        ({"method": "sparsegpt", "options": {"method": {"blocksize": True}}}, "setting blocksize must be an integer"),
        ({"refine": "dsnot", "options": {"refine": {"targets": 5}}}, "setting targets must be a list of strings"),
        ({"method": "ria", "options": {"method": {"permute": "yes"}}}, "setting permute must be true or false"),
        ({"allocation": "zigzag"}, "choose one of uniform, owl, or a .json file"),
    ],
)
def test_bad_recipes_give_one_clear_error(spec, message):
    with pytest.raises(SecateursError) as err:
        Recipe.from_dict(spec)
    assert message in str(err.value)


def test_every_stage_setting_is_a_documented_flag():
    """The config fields are the one source of truth: each setting has help text and a prune and sweep flag."""
    prune_help = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    sweep_help = build_parser()._subparsers._group_actions[0].choices["sweep"].format_help()
    for cls in registry.all_stages():
        assert cls.summary, cls
        if cls.name != "table":
            assert cls.name in prune_help
        for f in dataclasses.fields(cls):
            if cls.name == "table":
                continue
            assert f.metadata.get("help"), (cls.name, f.name)
            flag = f.metadata.get("flag") or f"--{cls.name}-{f.name.replace('_', '-')}"
            assert flag in prune_help and flag in sweep_help, flag


def test_flags_build_the_recipe_and_override_a_recipe_file(tmp_path):
    parser = build_parser()
    args = parser.parse_args(
        [
            "prune",
            "--method",
            "sparsegpt",
            "--blocksize",
            "64",
            "--allocation",
            "owl",
            "--owl-m",
            "3",
            "--pattern",
            "4:8",
        ]
    )
    recipe = recipe_from_args(args)
    assert recipe.method == secateurs.SparseGPT(blocksize=64) and recipe.allocation == secateurs.OWL(m=3.0)
    assert recipe.pattern == "4:8" and recipe.refine is None and recipe.update is None
    path = tmp_path / "r.yaml"
    chained().save(path)
    from_file = recipe_from_args(parser.parse_args(["prune", "--recipe", str(path)]))
    assert from_file == chained()
    overridden = recipe_from_args(parser.parse_args(["prune", "--recipe", str(path), "--dsnot-cycles", "3"]))
    assert overridden.refine == secateurs.DSnoT(cycles=3, targets=("*.mlp.*",))
    assert overridden.method == chained().method
    switched = recipe_from_args(parser.parse_args(["prune", "--recipe", str(path), "--method", "wanda"]))
    assert switched.method == secateurs.Wanda() and switched.allocation == chained().allocation


def test_prune_cli_takes_a_recipe_file_and_reports_it(tiny_model_dir, tmp_path, text_file):
    path = tmp_path / "recipe.yaml"
    Recipe(method="wanda", sparsity=0.6, refine=secateurs.DSnoT(cycles=5)).save(path)
    code, stdout, stderr = run_main(
        "prune", tiny_model_dir, "--recipe", path, "--calibration", text_file, "--nsamples", 2, "--seqlen", 32,
        "--eval", "none", "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads(stdout)
    assert Recipe.from_dict(report["recipe"]) == Recipe.load(path)


# ------------------------------------------------------------------------------------------------- engine contract
@dataclass(frozen=True)
class KeepAboveMean(Pruner):
    """A pruner written outside the package: prunes, per row, the inputs whose mean activation is lowest."""

    name: ClassVar[str] = "keep-above-mean"
    summary: ClassVar[str] = "test pruner"
    needs: ClassVar[frozenset[str]] = frozenset({MEAN})
    seen: ClassVar[list] = []

    def prune(self, W, stats, target):
        KeepAboveMean.seen.append((stats.x_sum is not None, stats.sq_norm, stats.H_sum, W.dtype))
        scores = (stats.x_sum / stats.ntokens).abs().reshape(1, -1).expand_as(W).float()
        return StageOutput(W, per_row(scores, target.sparsity), {"score": "mean"})


def test_a_new_pruner_is_one_class_and_one_registry_entry(monkeypatch):
    monkeypatch.setitem(registry.PRUNERS, KeepAboveMean.name, KeepAboveMean)
    KeepAboveMean.seen.clear()
    model = tiny_model("llama")
    windows = torch.randint(0, VOCAB, (3, 16))
    report = secateurs.prune(model, Recipe(method="keep-above-mean", sparsity=0.25), windows, progress=False)
    # the engine collected exactly the declared statistics: the sum of x, neither x^2 nor x x^T
    assert KeepAboveMean.seen and all(has and sq is None and H is None for has, sq, H, _ in KeepAboveMean.seen)
    for lin in report.linears:
        rows, cols = lin["shape"]
        assert lin["pruned"] == rows * int(cols * 0.25) and lin["info"] == {"score": "mean"}
    assert report.recipe["method"] == "keep-above-mean"


def test_masks_are_results():
    model = tiny_model("llama")
    assert all((m.weight != 0).all() for m in secateurs.find_linears(model.model.layers[0]).values())
    report = secateurs.prune(
        model, Recipe(method="wanda", pattern="2:4"), torch.randint(0, VOCAB, (2, 16)), progress=False
    )
    masks = report.mask_tensors()
    assert set(masks) == {lin["name"] for lin in report.linears}
    for lin in report.linears:
        W = model.get_submodule(lin["name"]).weight
        assert torch.equal(masks[lin["name"]], W == 0)
        assert report.masks[lin["name"]].digest() == lin["mask_sha256"]
        assert (masks[lin["name"]].reshape(W.shape[0], -1, 4).sum(-1) == 2).all()
    assert "masks" not in report.to_dict()
    json.dumps(report.to_dict())


def test_refiner_and_update_chain_keeps_counts_and_zeros():
    windows = torch.randint(0, VOCAB, (3, 16))
    plain = secateurs.prune(tiny_model("llama"), Recipe(method="wanda", sparsity=0.5), windows, progress=False)
    model = tiny_model("llama")
    report = secateurs.prune(
        model, Recipe(method="wanda", sparsity=0.5, refine="dsnot", update="sparsegpt"), windows, progress=False
    )
    masks = report.mask_tensors()
    for a, b in zip(plain.linears, report.linears, strict=True):
        W = model.get_submodule(b["name"]).weight
        assert b["pruned"] == a["pruned"] and (W[masks[b["name"]]] == 0).all()
        assert (masks[b["name"]].sum(1) == masks[b["name"]].shape[1] // 2).all()  # Wanda's per-row count survives
        assert {"dsnot", "sparsegpt"} <= set(b["info"])
    # the update lowers every layer's reconstruction error against the same masks without it
    assert sum(lay["output_error"] for lay in report.layers) < sum(lay["output_error"] for lay in plain.layers)


def test_row_selection_in_blocks_equals_one_sort(monkeypatch):
    from secateurs.oneshot import select

    torch.manual_seed(0)
    scores = torch.randn(37, 24)
    scores[3, :6] = 0.5  # ties: the earlier position is pruned first
    whole = {"row": select.per_row(scores, 0.4), "nm": select.n_of_m(scores, select.NM(2, 4))}
    monkeypatch.setattr(select, "ROWS_BLOCK_SCORES", 24 * 5)  # blocks of 5 rows, the last one short
    assert torch.equal(select.per_row(scores, 0.4), whole["row"])
    assert torch.equal(select.n_of_m(scores, select.NM(2, 4)), whole["nm"])
    assert whole["row"].sum(1).tolist() == [9] * 37
    transposed = scores.t().contiguous().t()  # the strides of a Conv1D weight's [out, in] view
    assert torch.equal(select.per_row(transposed, 0.4), whole["row"])
    assert torch.equal(select.n_of_m(transposed, select.NM(2, 4)), whole["nm"])
