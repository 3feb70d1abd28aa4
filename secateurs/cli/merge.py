"""``secateurs delta`` and ``secateurs merge``: the command line of :mod:`secateurs.merge`.

``secateurs delta BASE FINETUNED --drop 0.9 --output DIR`` writes the DARE'd delta compactly;
``secateurs delta apply BASE DELTA --output DIR`` writes base + delta as a model folder;
``secateurs merge BASE FT1 FT2 ... --method ties --output DIR`` merges (a delta folder counts as a model).
"""

from __future__ import annotations

import argparse

from secateurs.errors import SecateursError


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _add_dare(p: argparse.ArgumentParser, default_drop: float | None) -> None:
    p.add_argument(
        "--drop",
        type=float,
        default=default_drop,
        metavar="P",
        help="fraction of each delta's entries dropped at random (DARE's p, in [0, 1))"
        + (f" (default {default_drop})" if default_drop is not None else " (dare-* methods; default 0.9)"),
    )
    p.add_argument(
        "--rescale",
        choices=["dare", "darex"],
        default="dare",
        help="survivors x 1/(1-p) (dare), or x 1/q (darex: DAREx-q, q from --q or chosen on text by the smallest "
        "mean logit change against the fine-tuned model)",
    )
    p.add_argument("--q", type=float, default=None, help="DAREx-q's q in (0, 1] (with --rescale darex)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drop masks (and of the text windows)")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder that secateurs wrote")
    p.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16, float16")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress or log lines")


def add_parser(subparsers, name: str) -> None:
    """Register ``delta`` or ``merge`` (whichever ``name`` is)."""
    if name == "delta":
        p = subparsers.add_parser(
            name,
            help="the sparse delta of a fine-tuned model (DARE / DAREx-q), compact on disk; or apply one",
            usage="secateurs delta BASE FINETUNED --output DIR [options]\n       secateurs delta apply BASE DELTA "
            "--output DIR [--overwrite --dtype D --json --quiet]",
            description="secateurs delta BASE FINETUNED --drop P --output DIR: drop a fraction P of the delta "
            "finetuned - base at random, rescale the rest (DARE, or DAREx-q), and save it as a 1-bit mask plus the "
            "non-zero values, with its bytes against a dense delta in report.json. "
            "secateurs delta apply BASE DELTA --output DIR: write base + delta as a Hugging Face folder.",
        )
        p.add_argument("models", nargs="+", metavar="MODEL", help="BASE FINETUNED, or: apply BASE DELTA")
        _add_dare(p, 0.9)
        p.add_argument("--calibration", default="shakespeare", metavar="SOURCE", help="DAREx-q's text (bundled)")
        p.add_argument("--nsamples", type=int, default=4, help="DAREx-q: windows of text (default 4)")
        p.add_argument("--seqlen", type=int, default=128, help="DAREx-q: tokens per window (default 128)")
        _add_output(p)
        p.set_defaults(run=run_delta)
        return
    p = subparsers.add_parser(
        name,
        help="merge models fine-tuned from one base: average, task arithmetic, TIES, DARE + either, AdaMerging",
        description="Merge fine-tuned models (or saved deltas) of BASE into one Hugging Face folder. Every model "
        "must have the base's architecture and tensors; the first tensor that differs is named otherwise.",
    )
    p.add_argument("base", help="the base model (local folder, .gguf, smollm2-135m, hub id)")
    p.add_argument("models", nargs="+", metavar="MODEL", help="fine-tuned models or delta folders of BASE")
    p.add_argument(
        "--method",
        required=True,
        choices=["average", "task-arithmetic", "ties", "dare-ta", "dare-ties", "adamerging"],
        help="how to merge (adamerging: coefficients learned on --texts, one per model)",
    )
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="scale of the merged task vector (1.0)")
    p.add_argument("--k", type=float, default=None, help="TIES: fraction of each task vector kept (0.2; dare-ties 1)")
    _add_dare(p, None)
    p.add_argument("--texts", default=None, metavar="SRC1,SRC2", help="unlabelled text per model (AdaMerging, DAREx)")
    p.add_argument("--nsamples", type=int, default=16, help="windows per text (default 16)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--granularity", choices=["task", "layer"], default="layer", help="AdaMerging: per task or tensor")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="AdaMerging: Adam steps (default 500, the paper's; each is a forward and backward pass per task)",
    )
    p.add_argument("--lr", type=float, default=None, help="AdaMerging: learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=None, help="AdaMerging: windows per task per step (default 16)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="tensors left as the base's")
    _add_output(p)
    p.set_defaults(run=run_merge)


def run_delta(args) -> dict:
    from secateurs.data.calibration import Calibration
    from secateurs.merge.delta import DARE
    from secateurs.merge.folders import apply_folder, delta_folder

    if args.models[0] == "apply":
        if len(args.models) != 3:
            raise SecateursError("usage: secateurs delta apply BASE DELTA --output DIR")
        return apply_folder(args.models[1], args.models[2], args.output, overwrite=args.overwrite, dtype=args.dtype)
    if len(args.models) != 2:
        raise SecateursError("usage: secateurs delta BASE FINETUNED --output DIR, or secateurs delta apply BASE DELTA")
    config = DARE(drop=args.drop, rescale=args.rescale, q=args.q, seed=args.seed)
    calibration = Calibration(args.calibration, args.nsamples, args.seqlen, args.seed)
    if config.rescale == "darex" and config.q is None:
        from secateurs import data

        data.describe_source(args.calibration)
    base, finetuned = args.models
    return delta_folder(
        base, finetuned, args.output, config, calibration=calibration, overwrite=args.overwrite, dtype=args.dtype
    )


def run_merge(args) -> dict:
    from secateurs.merge.adamerging import AdaMerging
    from secateurs.merge.delta import DARE
    from secateurs.merge.folders import merge_folder
    from secateurs.merge.methods import build_method

    if args.method == "adamerging":
        given = [flag for flag, v in (("--lambda", args.lam), ("--k", args.k), ("--drop", args.drop)) if v is not None]
        if given:
            raise SecateursError(f"adamerging learns its coefficients: {', '.join(given)} does not apply")
        settings = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size}
        method = AdaMerging(
            granularity=args.granularity, seed=args.seed, **{k: v for k, v in settings.items() if v is not None}
        )
    else:
        dare = None
        if args.method.startswith("dare-"):
            dare = DARE(drop=0.9 if args.drop is None else args.drop, rescale=args.rescale, q=args.q, seed=args.seed)
        elif args.drop is not None or args.q is not None or args.rescale != "dare":
            raise SecateursError(f"--drop, --rescale and --q are for dare-ta and dare-ties, not {args.method}")
        method = build_method(args.method, args.lam, args.k, dare)
    return merge_folder(
        args.base,
        args.models,
        args.output,
        method,
        texts=_split(args.texts) or None,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        exclude=args.exclude,
        overwrite=args.overwrite,
        dtype=args.dtype,
        progress=not args.quiet,
    )
