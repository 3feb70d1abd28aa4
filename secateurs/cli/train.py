"""``secateurs train``: sparse-train a small image classifier from a recipe file and/or flags.

Every setting of every registered training method is a flag ``--{method}-{setting}`` (``--rigl-interval 50``),
made from the method's dataclass fields (type, help, default) as ``secateurs prune`` makes its stage flags; a
flag given overrides the recipe file, a flag left out keeps the file's value (or the default).
"""

from __future__ import annotations

import argparse
import logging

from secateurs.cli.stages import add_setting_flags, config_settings, given_values
from secateurs.errors import SecateursError
from secateurs.train.loop import DATA, OPTIMIZERS, TrainConfig, train
from secateurs.train.registry import METHODS

log = logging.getLogger("secateurs")

# recipe field -> the flag's dest, for the plain flags (None: not given)
PLAIN = (
    "data",
    "bias",
    "model",
    "distribution",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "optimizer",
    "seed",
    "eval_every",
    "checkpoint_every",
)


def method_settings() -> list[tuple]:
    """(method, setting, flags, help, type name, default) for every setting of every registered method."""
    return config_settings(METHODS.values())


def dest(method: str, setting: str) -> str:
    return f"method__{method.replace('-', '_')}__{setting}"


def add_method_settings(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("method settings (used when that method is chosen)")
    add_setting_flags(group, method_settings(), dest, list_metavar="V")


def given_method_settings(args) -> dict[str, dict]:
    """Method name -> {setting: value} for every method flag given on the command line."""
    return given_values(args, method_settings(), dest)


def add_parser(subparsers, name: str) -> None:
    methods = ", ".join(f"{n} ({cls.summary})" if cls.summary else n for n, cls in METHODS.items())
    p = subparsers.add_parser(
        name,
        help="sparse-train a small image classifier (digits, coloured digits) from a recipe; resumable",
        description="Sparse-train an MLP or CNN on real images under a sparse-training method, evaluate it, and "
        "write model.safetensors (masks baked in), metrics.json, plots.png and the recipe.yaml that ran into "
        "--output. Checkpoints go there too: --resume continues an interrupted run exactly.",
    )
    p.add_argument("recipe", nargs="?", default=None, metavar="RECIPE", help="recipe file (.yaml/.yml or .json)")
    p.add_argument("--method", default=None, metavar="NAME", help=f"training method: {methods} (default static)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--sparsity", type=float, default=None, help="fraction of zeros in the targets (default 0.9)")
    group.add_argument("--pattern", default=None, metavar="N:M", help="N:M sparsity instead, e.g. 2:4 (srste, static)")
    p.add_argument("--distribution", choices=["erk", "uniform"], default=None, help="per-layer sparsity (default erk)")
    p.add_argument(
        "--targets", nargs="+", action="extend", default=None, metavar="GLOB", help="modules to make sparse (default *)"
    )
    p.add_argument("--exclude", nargs="+", action="extend", default=None, metavar="GLOB", help="modules left dense")
    p.add_argument("--data", choices=DATA, default=None, help="image data (default digits)")
    p.add_argument("--bias", type=float, default=None, help="coloured data: train colour = label this often (0.95)")
    p.add_argument("--model", choices=["mlp", "cnn"], default=None, help="model (default mlp)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training images (default 10)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 64)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate, cosine to 0 (default 0.1)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (default 5e-4)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="optimizer (default sgd)")
    p.add_argument("--seed", type=int, default=None, help="data split, colours, initial weights and masks, order")
    p.add_argument("--eval-every", type=int, default=None, metavar="STEPS", help="evaluate every N steps (0: epoch)")
    p.add_argument(
        "--checkpoint-every", type=int, default=None, metavar="STEPS", help="checkpoint every N steps (0: epoch)"
    )
    p.add_argument("--output", "-o", default=None, metavar="DIR", help="run folder: checkpoints, model, metrics")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in an --output that holds a training run")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEPS", help="stop (checkpointed) after N steps")
    p.add_argument("--no-plots", action="store_true", help="do not draw plots.png")
    p.add_argument(
        "--save-format",
        choices=["safetensors", "sparse"],
        default="safetensors",
        help="the trained model as model.safetensors, or compact sparse (model.sparse.safetensors + module.json, "
        "run by secateurs.load_sparse on the CPU kernel)",
    )
    p.add_argument("--device", default="cpu", help="cpu (bit-exact resume), cuda, cuda:N")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    add_method_settings(p)
    p.set_defaults(run=run)


def config_from_args(args) -> TrainConfig:
    """The recipe the flags describe: the recipe file (or the defaults), then every flag given on top of it."""
    base = TrainConfig.load(args.recipe).to_dict() if args.recipe else TrainConfig().to_dict()
    for key in PLAIN:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    if args.method is not None and args.method.strip().lower() != base["method"]:
        base["method"] = args.method.strip().lower()
        base["method_options"] = {}  # another method: its settings start from its defaults
    if args.sparsity is not None:
        base["sparsity"], base["pattern"] = args.sparsity, None
    if args.pattern is not None:
        base["pattern"] = args.pattern
    for key in ("targets", "exclude"):
        if getattr(args, key):
            base[key] = list(getattr(args, key))
    settings = given_method_settings(args)
    if base["method"] in settings:
        base["method_options"] = {**base["method_options"], **settings[base["method"]]}
    unused = sorted(set(settings) - {base["method"]})
    if unused:
        log.warning("settings for %s given, but the method is %s: ignored", ", ".join(unused), base["method"])
    return TrainConfig.from_dict(base)


def run(args) -> dict:
    if args.resume and not args.output:
        raise SecateursError("--resume needs --output DIR (the folder of the run to continue)")
    if args.resume and args.overwrite:
        raise SecateursError("--resume and --overwrite exclude each other")
    config = config_from_args(args)
    if not args.output:
        log.warning("no --output: the trained model will not be saved")
    metrics = train(
        config,
        args.output,
        resume=args.resume,
        progress=not args.quiet,
        overwrite=args.overwrite,
        device=args.device,
        stop_after=args.stop_after,
        plots=not args.no_plots,
        save_format=args.save_format,
    )
    final = metrics.get("final")
    if final:
        log.info(
            "%s, %s: test accuracy %.4f, sparsity %.4f, %d mask updates, %.1f s",
            config.method,
            config.pattern or f"{config.sparsity:g}",
            final["accuracy"],
            metrics["sparsity"]["overall"],
            metrics["updates"],
            metrics["wall_seconds"],
        )
    return metrics
