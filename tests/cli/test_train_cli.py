"""``secateurs train``: recipe file + flags, method settings as flags, the files it writes, one-line errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from secateurs.cli import build_parser, main
from secateurs.cli.train import config_from_args
from secateurs.train.loop import TrainConfig
from secateurs.train.registry import METHODS

QUICK = ["--epochs", "1", "--batch-size", "256", "--quiet", "--no-plots"]


def test_every_method_setting_is_a_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name, cls in METHODS.items():
        for setting in (f.name for f in dataclasses.fields(cls)):
            assert f"--{name}-{setting.replace('_', '-')}" in help_text


def test_flags_override_the_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    TrainConfig(method="rigl", method_options={"interval": 7, "alpha": 0.4}, epochs=3, lr=0.2).save(recipe)
    args = build_parser().parse_args(
        ["train", str(recipe), "--rigl-interval", "5", "--lr", "0.05", "--targets", "layers.*", "--pattern", "2:4"]
    )
    c = config_from_args(args)
    assert (c.method, c.epochs, c.lr, c.targets, c.pattern) == ("rigl", 3, 0.05, ["layers.*"], "2:4")
    assert c.method_options["interval"] == 5 and c.method_options["alpha"] == 0.4
    c = config_from_args(build_parser().parse_args(["train", str(recipe), "--method", "set", "--sparsity", "0.8"]))
    assert c.method == "set" and c.method_options == METHODS["set"]().options() and c.sparsity == 0.8


def test_train_command_writes_a_resumable_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "set", "--set-interval", "2", "--sparsity", "0.8", "-o", str(out), *QUICK]
    assert main([*args, "--stop-after", "3"]) == 0
    assert not (out / "metrics.json").exists() and (out / "checkpoint.json").exists()
    capsys.readouterr()
    assert main([*args, "--resume", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["complete"] and metrics["resumed_from"] == 3 and metrics["updates"] >= 1
    assert metrics["sparsity"]["overall"] == pytest.approx(0.8, abs=0.01)
    assert TrainConfig.load(out / "recipe.yaml") == TrainConfig.from_dict(metrics["config"])
    # the saved recipe reruns the same run
    assert main(["train", str(out / "recipe.yaml"), "-o", str(tmp_path / "again"), "--json", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["evals"] == metrics["evals"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "bogus"], "unknown training method 'bogus'"),
        (["--method", "srste"], "srste needs an N:M pattern"),
        (["--method", "rigl", "--rigl-granularity", "row"], "rigl: granularity must be"),
        (["--resume"], "--resume needs --output"),
        (["--targets", "nothing*"], "target 'nothing*' matches no Linear or Conv module"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    assert main(["train", *argv, *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("secateurs: error: ") and message in err and "\n" not in err


def test_unknown_recipe_field_is_one_line(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps({"method": "rigl", "epoch": 2}))
    assert main(["train", str(tmp_path / "r.json"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown recipe field(s): epoch" in err and "\n" not in err
