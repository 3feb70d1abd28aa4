"""Command-line options shared by several commands: device, dtype, evaluation text, zero-shot tasks."""

from __future__ import annotations

import argparse

PAPER_HINT = "paper protocol: --calibration c4 --nsamples 128 --seqlen 2048 --eval wikitext2"


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (as stored; fp32 for GGUF), float32, bfloat16, float16")
    p.add_argument("--json", action="store_true", help="print the machine-readable report on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def add_eval(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--eval",
        default=default,
        metavar="SOURCE",
        help="evaluation text: bundled name, .txt/.jsonl path, wikitext2, c4; 'none' to skip"
        + (f" (default: {default})" if default else ""),
    )
    p.add_argument(
        "--eval-windows",
        type=_windows,
        default="auto",
        metavar="N",
        help="score the first N windows, or 'all' (default auto: all for wikitext2, 256 for c4, "
        "40 for bundled and local text)",
    )
    p.add_argument(
        "--bos",
        choices=["auto", "always", "never"],
        default="auto",
        help="BOS at the start of each window: auto = when the tokenizer adds one by default",
    )


def add_tasks(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tasks",
        default=None,
        metavar="T1,T2",
        help="zero-shot accuracy through lm-eval (pip install 'secateurs[eval]'): comma-separated lm-eval task "
        "names (boolq, piqa, arc_easy, hellaswag ... need the hub) or the bundled offline tasks: bible_next_sentence, "
        "and the graded family bible_next_{2,4,8}_{far,near} (2/4/8 candidates, distractors far or near)",
    )
    p.add_argument("--limit", type=_positive, default=None, metavar="N", help="score the first N examples per task")
    p.add_argument(
        "--num-fewshot", type=_count, default=0, metavar="K", help="examples put before each question (default 0)"
    )
    p.add_argument(
        "--batch-size",
        type=_batch_size,
        default=8,
        metavar="B",
        help="accuracy: requests per forward pass, or auto (default 8)",
    )


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


_positive, _count = _at_least(1), _at_least(0)


def _batch_size(text: str):
    return "auto" if text == "auto" else _positive(text)


def _windows(text: str):
    if text in ("auto", "all"):
        return None if text == "all" else "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'all' or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def bos_choice(arg: str) -> bool | None:
    """``--bos auto|always|never`` as ``evaluate(bos=...)`` takes it."""
    return {"auto": None, "always": True, "never": False}[arg]
