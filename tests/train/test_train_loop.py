"""The image-classification loop: recipes round-trip, a short real run on digits writes what it should, and a
resumed run equals an uninterrupted one bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from secateurs.errors import SecateursError
from secateurs.train.loop import TrainConfig, epoch_order, train

FAST = dict(model_options={"hidden": [32]}, epochs=2, batch_size=128)


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**FAST, "method": "rigl", "method_options": {"interval": 4}, **kw})


# ---- recipes
@pytest.mark.parametrize("name", ["recipe.yaml", "recipe.json"])
def test_recipe_round_trips(tmp_path, name):
    c = config(pattern=None, distribution="uniform", exclude=["classifier"], optimizer="adamw")
    c.save(tmp_path / name)
    again = TrainConfig.load(tmp_path / name)
    assert again == c and again.method_options == {"alpha": 0.3, "interval": 4, "end": 0.75, "granularity": "weight"}


def test_recipe_accepts_method_as_mapping_and_rejects_bad_fields(tmp_path):
    (tmp_path / "r.yaml").write_text("method: {name: set, zeta: 0.2}\nepochs: 3\n")
    c = TrainConfig.load(tmp_path / "r.yaml")
    assert c.method == "set" and c.method_options["zeta"] == 0.2 and c.epochs == 3
    (tmp_path / "bad.yaml").write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(SecateursError, match="unknown recipe field.*learning_rate"):
        TrainConfig.load(tmp_path / "bad.yaml")
    for bad, match in (
        ({"epochs": "3"}, "epochs must be an integer"),
        ({"lr": True}, "lr must be a number"),
        ({"data": "cifar"}, "unknown data"),
        ({"method": "rigl", "method_options": {"zeta": 0.1}}, "unknown setting.*zeta"),
        ({"pattern": "5:4"}, "invalid N:M pattern"),
    ):
        with pytest.raises(SecateursError, match=match):
            TrainConfig.from_dict(bad)


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))
    assert not torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 2))
    assert sorted(epoch_order(50, 3, 1).tolist()) == list(range(50))


# ---- a real run
def test_train_writes_model_metrics_plots_and_recipe(tmp_path):
    c = config(eval_every=5)
    out = tmp_path / "run"
    metrics = train(c, out, progress=False)
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors",
        "metrics.json",
        "plots.png",
        "recipe.yaml",
        "checkpoint.json",
        "checkpoint.safetensors",
    }
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    assert TrainConfig.load(out / "recipe.yaml") == c
    assert TrainConfig.load(out / "metrics.json") == c  # a run's metrics name the recipe that made them
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["total_steps"] == metrics["total_steps"] == 2 * 11
    steps = [r["step"] for r in saved["evals"]]
    assert steps == [5, 10, 15, 20, 22]
    assert all(0 <= r["accuracy"] <= 1 and r["test_loss"] > 0 for r in saved["evals"])
    assert saved["updates"] == len(saved["history"]) >= 3
    assert all("churn" in layer for h in saved["history"] for layer in h["layers"].values())
    assert saved["mask_bytes"] == 64 * 32 + 32 * 10  # one byte per weight of layers.0 and classifier
    weights = load_file(str(out / "model.safetensors"))
    assert not any("parametrizations" in k or "sparse_keep" in k for k in weights)
    zeros = sum(int((weights[f"{n}.weight"] == 0).sum()) for n in saved["sparsity"]["by_layer"])
    assert zeros == sum(v["zeros"] for v in saved["sparsity"]["by_layer"].values())
    assert saved["sparsity"]["overall"] == pytest.approx(0.9, abs=0.01)
    assert saved["peak_memory"]["rss_bytes"] > 0 and saved["wall_seconds"] > 0


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="rigl", method_options={"interval": 4}),
        dict(method="set", method_options={"interval": 3}, model="cnn", model_options={"width": 4}, optimizer="adamw"),
    ],
    ids=["rigl-mlp-sgd", "set-cnn-adamw"],
)
def test_resume_equals_an_uninterrupted_run(tmp_path, kw):
    c = config(checkpoint_every=4, eval_every=3, **kw)
    full = train(c, tmp_path / "full", progress=False, plots=False)
    part = train(c, tmp_path / "part", progress=False, stop_after=9)  # mid-epoch (11 steps an epoch)
    assert part["complete"] is False and part["step"] == 9
    assert not (tmp_path / "part" / "model.safetensors").exists()
    rest = train(c, tmp_path / "part", resume=True, progress=False, plots=False)
    assert rest["resumed_from"] == 9
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rest["evals"] == full["evals"] and rest["history"] == full["history"]


def test_checkpoint_of_another_recipe_or_model_is_one_clear_error(tmp_path):
    out = tmp_path / "run"
    train(config(), out, progress=False, stop_after=2)
    with pytest.raises(SecateursError, match=r"another recipe \(differs in: lr\)"):
        train(config(lr=0.05), out, resume=True, progress=False)
    with pytest.raises(SecateursError, match="not empty.*--resume"):
        train(config(), out, progress=False)
    state = json.loads((out / "checkpoint.json").read_text())
    state["recipe"]["model_options"] = {"hidden": [16]}
    (out / "checkpoint.json").write_text(json.dumps(state))
    with pytest.raises(SecateursError, match="another model"):
        train(config(model_options={"hidden": [16]}), out, resume=True, progress=False)
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SecateursError, match="cannot read the checkpoint"):
        train(config(), out, resume=True, progress=False)


def test_rest_on_coloured_digits_reports_groups_and_needs_groups():
    c = config(method="rest", method_options={"interval": 4}, data="coloured-digits", bias=0.9, epochs=1)
    metrics = train(c, progress=False)
    final = metrics["final"]
    assert {"aligned", "conflicting", "worst_group", "worst_of_two"} <= set(final)
    assert final["worst_group"] <= final["accuracy"]
    with pytest.raises(SecateursError, match="rest needs data with bias groups"):
        train(config(method="rest", epochs=1), progress=False)


def test_srste_trains_an_nm_pattern(tmp_path):
    c = config(method="srste", method_options={}, pattern="2:4", epochs=1)
    metrics = train(c, tmp_path / "nm", progress=False, plots=False)
    w = load_file(str(tmp_path / "nm" / "model.safetensors"))["layers.0.weight"]
    assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    assert metrics["sparsity"]["overall"] >= 0.5 and metrics["mask_bytes"] == 0


def test_sparse_save_format_runs_on_the_kernel(tmp_path):
    import secateurs
    from secateurs.runtime.linear import SparseLinear

    c = config(distribution="uniform", epochs=1)
    metrics = train(c, tmp_path / "run", progress=False, plots=False, save_format="sparse")
    out = tmp_path / "run"
    assert (out / "model.sparse.safetensors").is_file() and (out / "module.json").is_file()
    assert not (out / "model.safetensors").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    model, _ = secateurs.load_sparse(out)
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 2
    from secateurs.train.loop import load_data

    data = load_data(c)
    with torch.no_grad():
        accuracy = float((model(data.test_x).argmax(1) == data.test_y).float().mean())
    assert accuracy == pytest.approx(metrics["final"]["accuracy"], abs=1e-6)  # the kernel gives the same answers
    with pytest.raises(SecateursError, match="unknown save format"):
        train(c, save_format="pickle", progress=False)


def test_run_files_follow_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        train(config(epochs=1), tmp_path / "run", progress=False, plots=False)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "checkpoint.safetensors", "checkpoint.pt", "metrics.json"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name
