"""``secateurs sweep``: the command line of :mod:`secateurs.sweep`."""

from __future__ import annotations

import argparse
from pathlib import Path

from secateurs.analysis.summary import DEFAULT_TOLERANCE
from secateurs.cli.options import add_common, add_eval, add_tasks, bos_choice
from secateurs.cli.stages import add_stage_choices, add_stage_settings, given_settings
from secateurs.data.calibration import Calibration
from secateurs.errors import Interrupted, SecateursError
from secateurs.evaluate.zeroshot import parse_tasks
from secateurs.sweep import CELLS, Grid, Sweep


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in _split(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(
        name,
        help="prune one model over a grid of recipes (resumable); table and HTML report with plots",
        description="Prune one model over a grid of recipes, resumably (rerun the same command to resume), and "
        "write results.csv, results.json and a static report.html with plots into the output folder.",
    )
    p.add_argument("model", nargs="?", default="smollm2-135m", help="hub id, local HF folder, .gguf file, smollm2-135m")
    add_stage_choices(p, sweep=True)
    p.add_argument(
        "--sparsities",
        type=_floats,
        default=None,
        metavar="S,...",
        help="comma-separated unstructured sparsities (default 0.5,0.6,0.7, or none when --patterns is given)",
    )
    p.add_argument("--patterns", default="", metavar="N:M,...", help="comma-separated N:M patterns, e.g. 2:4,4:8")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="leave matching linears dense")
    p.add_argument("--calibration", default="shakespeare", metavar="SOURCE", help="calibration text (as for prune)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window, calibration and evaluation")
    p.add_argument("--seed", type=int, default=0)
    add_eval(p, "bible")
    add_tasks(p)
    p.add_argument(
        "--knee-tolerance",
        type=float,
        metavar="T",
        default=DEFAULT_TOLERANCE,
        help="essential sparsity: where perplexity first exceeds dense x (1 + this) (default 0.2)",
    )
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="sweep folder (created, or resumed)")
    p.add_argument("--fresh", action="store_true", help="discard the cells of an existing sweep folder first")
    add_stage_settings(p)
    add_common(p)
    p.set_defaults(run=run)


def run(args) -> dict:
    """``secateurs sweep``: build the :class:`Sweep` from the arguments and run it."""
    if not args.eval or args.eval.lower() == "none":
        raise SecateursError("sweep needs an evaluation text (--eval SOURCE)")
    if args.knee_tolerance < 0:
        raise SecateursError(f"--knee-tolerance must be >= 0, got {args.knee_tolerance}")
    if args.num_fewshot:
        raise SecateursError("sweep scores tasks zero-shot: --num-fewshot is not supported here")
    patterns = _split(args.patterns)
    sparsities = args.sparsities if args.sparsities is not None else ([] if patterns else [0.5, 0.6, 0.7])
    grid = Grid(
        methods=_split(args.methods),
        sparsities=sparsities,
        patterns=patterns,
        allocations=_split(args.allocations),
        refines=[None if r.lower() == "none" else r for r in _split(args.refine)],
        updates=[None if u.lower() == "none" else u for u in _split(args.updates)],
        settings=given_settings(args),
        exclude=args.exclude,
    )
    sweep = Sweep(
        model=args.model,
        grid=grid,
        output=args.output,
        calibration=Calibration(args.calibration, args.nsamples, args.seqlen, args.seed),
        eval_source=args.eval,
        eval_windows=args.eval_windows,
        bos=bos_choice(args.bos),
        dtype=args.dtype,
        device=args.device,
        tolerance=args.knee_tolerance,
        fresh=args.fresh,
        progress=not args.quiet,
        tasks=parse_tasks(args.tasks),
        limit=args.limit,
        batch_size=args.batch_size,
    )
    try:
        return sweep.run()
    except KeyboardInterrupt:
        raise Interrupted(
            f"the finished cells are kept in {Path(args.output) / CELLS} (results.json, results.csv and report.html "
            "say the sweep is incomplete): run the same command again to resume"
        ) from None
