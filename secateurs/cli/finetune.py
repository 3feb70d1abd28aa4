"""``secateurs finetune PRUNED_DIR --output DIR``: fine-tune a pruned model and keep its sparsity exactly."""

from __future__ import annotations

import argparse

from secateurs.cli.options import _positive, _windows, add_common


def _lr(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _eval_windows(text: str):
    """``--eval-windows``: N, 'auto' or 'all' (kept as the word, so that None can mean: as the pruning report)."""
    return "all" if text == "all" else _windows(text)


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(
        name,
        help="fine-tune a pruned model (full or LoRA) keeping its pruned weights exactly zero",
        description="Fine-tune the output folder of secateurs prune on calibration-style text with AdamW: full "
        "fine-tuning under the saved masks (masks.safetensors, else the zeros of the decoder linears), or LoRA "
        "adapters merged through the masks (--lora, needs pip install 'secateurs[finetune]'). Perplexity is "
        "measured before and after with the protocol of prune, on held-out text.",
    )
    p.add_argument("pruned", metavar="PRUNED_DIR", help="a folder written by secateurs prune (hf or sparse format)")
    p.add_argument(
        "--data",
        default="shakespeare",
        metavar="SOURCE",
        help="training text: bundled name (shakespeare, bible), .txt/.jsonl path, c4, wikitext2 (default shakespeare)",
    )
    p.add_argument("--steps", type=int, default=200, metavar="N", help="optimizer steps (default 200)")
    p.add_argument("--seqlen", type=int, default=256, metavar="L", help="tokens per training window (256)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="windows per step (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training windows and the adapters")
    p.add_argument(
        "--lr", type=_lr, default=None, help="peak learning rate (default 2e-5 full, 2e-4 LoRA; warmup, linear decay)"
    )
    p.add_argument("--lora", type=int, default=None, metavar="R", help="train LoRA adapters of rank R instead")
    p.add_argument("--lora-alpha", type=_lr, default=None, metavar="A", help="LoRA alpha (default: the rank)")
    p.add_argument(
        "--eval",
        default="bible",
        metavar="SOURCE",
        help="held-out evaluation text: bundled name, .txt/.jsonl path, wikitext2, c4; 'none' to skip (default bible)",
    )
    p.add_argument(
        "--eval-windows",
        type=_eval_windows,
        default=None,
        metavar="N",
        help="score the first N windows, 'all' or 'auto' (default: as the pruning report, else auto)",
    )
    p.add_argument(
        "--eval-seqlen",
        type=_positive,
        default=None,
        metavar="L",
        help="tokens per evaluation window (default: as the pruning report, else 512)",
    )
    p.add_argument("--output", "-o", default=None, metavar="DIR", help="where to save the fine-tuned model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument(
        "--save-format",
        choices=["hf", "sparse"],
        default="hf",
        help="hf: a plain Hugging Face folder; sparse: pruned linears as a 1-bit mask plus their non-zero values",
    )
    add_common(p)
    p.set_defaults(run=_run)


def _run(args) -> dict:
    import logging

    from secateurs.train.finetune import finetune

    if args.output is None:
        logging.getLogger("secateurs").warning("no --output: the fine-tuned model will not be saved")
    _, _, report = finetune(
        args.pruned,
        data=args.data,
        steps=args.steps,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        lora=args.lora,
        lora_alpha=args.lora_alpha,
        eval_source=args.eval,
        eval_windows=args.eval_windows,
        eval_seqlen=args.eval_seqlen,
        device=args.device,
        dtype=args.dtype,
        output=args.output,
        overwrite=args.overwrite,
        save_format=args.save_format,
        progress=not args.quiet,
    )
    return report
