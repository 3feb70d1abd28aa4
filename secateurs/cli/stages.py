"""Command-line flags made from the stage configs, and the Recipe they describe.

Every setting of every registered stage becomes one flag, ``--{stage}-{setting}`` (plus the spellings a stage lists
in ``flag_aliases``), with the field's type, help text and default: the config classes are the only place where a
setting is defined. The stage choices (``--method``, ``--allocation``, ``--refine``, ``--update``) come from the
registry. A flag left out keeps the stage's default, or the value in ``--recipe FILE``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from secateurs.oneshot.moe import UNROUTED
from secateurs.oneshot.recipe import Recipe
from secateurs.oneshot.registry import KINDS, all_stages
from secateurs.oneshot.stage import NUMBER_OR_AUTO, number_or_auto

log = logging.getLogger("secateurs")

STAGE_ARGS = {"pruner": "method", "allocation": "allocation", "refiner": "refine", "update": "update"}


def config_settings(classes) -> list[tuple]:
    """(config name, field, flag spellings, help, type name, default) once per distinct setting of the config
    classes (stages, training methods): ``--{name}-{field}`` plus the spellings a class lists in ``flag_aliases``."""
    seen = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            key = (cls.name, f.name)
            flags = (f.metadata.get("flag") or f"--{cls.name}-{f.name.replace('_', '-')}",)
            flags += tuple(getattr(cls, "flag_aliases", {}).get(f.name, ()))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if key not in seen:
                seen[key] = (cls.name, f.name, flags, f.metadata.get("help", ""), str(f.type), default)
            else:  # two stages of one name (a pruner and an update): one flag sets both
                name, field, old_flags, help, kind, _ = seen[key]
                seen[key] = (name, field, tuple(dict.fromkeys(old_flags + flags)), help, kind, default)
    return list(seen.values())


def _settings():
    """Every stage setting (the table allocation is named by its file: --allocation FILE.json)."""
    return config_settings(cls for cls in all_stages() if cls.name != "table")


def add_setting_flags(group, settings, dest_of, list_metavar: str = "GLOB") -> None:
    """One flag per entry of :func:`config_settings`, typed from its field, stored under ``dest_of(name, field)``
    with default None (a flag left out keeps the recipe's value)."""
    for name, field, flags, help, kind, default in settings:
        shown = ", ".join(default) if isinstance(default, tuple) else default
        text = f"{name}: {help} (default {shown if shown != '' else 'none'})"
        if kind.startswith("tuple"):
            group.add_argument(
                *flags, dest=dest_of(name, field), action="append", default=None, metavar=list_metavar, help=text
            )
        elif kind == "bool":
            group.add_argument(
                *flags, dest=dest_of(name, field), action=argparse.BooleanOptionalAction, default=None, help=text
            )
        elif kind == NUMBER_OR_AUTO:
            group.add_argument(
                *flags, dest=dest_of(name, field), type=number_or_auto, default=None, metavar="X|auto", help=text
            )
        else:
            convert = {"int": int, "float": float}.get(kind, str)
            group.add_argument(
                *flags, dest=dest_of(name, field), type=convert, default=None, metavar=kind.upper(), help=text
            )


def given_values(args, settings, dest_of) -> dict[str, dict]:
    """Config name -> {setting: value} for every flag of ``settings`` given on the command line."""
    out: dict[str, dict] = {}
    for name, field, *_ in settings:
        value = getattr(args, dest_of(name, field), None)
        if value is not None:
            out.setdefault(name, {})[field] = value
    return out


def dest(stage: str, field: str) -> str:
    return f"stage__{stage.replace('-', '_')}__{field}"


def _choices(kind: str) -> str:
    return "; ".join(f"{name}: {cls.summary}" for name, cls in KINDS[kind].items() if name != "table")


def add_stage_choices(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """``--method``, ``--allocation``, ``--refine``, ``--update`` (comma-separated axes with ``sweep``), and
    ``--unrouted-experts``: what the stages do with an MoE expert that has no statistics."""
    pruners, refiners, updates = (", ".join(KINDS[k]) for k in ("pruner", "refiner", "update"))
    if sweep:
        p.add_argument("--methods", default="wanda", metavar="M,...", help=f"pruners: {pruners} (default wanda)")
        p.add_argument(
            "--allocations", default="uniform", metavar="A,...", help="uniform,owl,FILE.json (default uniform)"
        )
        p.add_argument("--refine", default="none", metavar="R,...", help=f"none,{refiners} (default none)")
        p.add_argument(
            "--updates", default="none", metavar="U,...", help=f"weight updates: none,{updates} (default none)"
        )
        return
    p.add_argument("--method", default=None, metavar="PRUNER", help=f"{_choices('pruner')} (default wanda)")
    p.add_argument(
        "--allocation",
        default=None,
        metavar="uniform|owl|FILE.json",
        help=f"per-layer sparsity: {_choices('allocation')}; or a JSON file mapping layer index or name to sparsity",
    )
    p.add_argument("--refine", default=None, metavar="none|" + refiners.replace(", ", "|"), help=_choices("refiner"))
    p.add_argument(
        "--update",
        default=None,
        metavar="none|" + updates.replace(", ", "|"),
        help=f"new values for the kept weights of the final mask: {_choices('update')}",
    )
    p.add_argument(
        "--unrouted-experts",
        choices=UNROUTED,
        default=None,
        help="MoE models: an expert no calibration token was routed to has no statistics; leave it dense or prune "
        "it by magnitude (default dense)",
    )


def add_stage_settings(p: argparse.ArgumentParser) -> None:
    add_setting_flags(p.add_argument_group("stage settings (used when that stage is chosen)"), _settings(), dest)


def given_settings(args) -> dict[str, dict]:
    """Stage name -> {setting: value} for every stage flag given on the command line."""
    return given_values(args, _settings(), dest)


def recipe_from_args(args) -> Recipe:
    """The recipe the prune flags describe: ``--recipe FILE`` first, then every flag given on top of it."""
    base = Recipe.load(args.recipe).to_dict() if getattr(args, "recipe", None) else Recipe().to_dict()
    options = base.pop("options")
    settings = given_settings(args)
    for arg in STAGE_ARGS.values():
        value = getattr(args, arg)
        if value is not None and value != base[arg]:
            base[arg] = value
            options.pop(arg, None)  # another stage: its settings start from its defaults
    if args.sparsity is not None or args.pattern is not None:
        base["sparsity"] = 0.5 if args.sparsity is None else args.sparsity
        base["pattern"] = args.pattern
    if args.exclude:
        base["exclude"] = list(args.exclude)
    if getattr(args, "unrouted_experts", None):
        base["unrouted_experts"] = args.unrouted_experts
    chosen = {}
    for arg in STAGE_ARGS.values():
        name = base[arg]
        if name is None or str(name).lower() == "none":
            continue
        key = "table" if arg == "allocation" and str(name).endswith(".json") else str(name).lower()
        chosen[key] = arg
        if key in settings:
            options[arg] = {**options.get(arg, {}), **settings[key]}
    unused = sorted(set(settings) - set(chosen))
    if unused:
        log.warning("settings for %s given, but that stage is not in the recipe: ignored", ", ".join(unused))
    return Recipe.from_dict({**base, "options": options})
