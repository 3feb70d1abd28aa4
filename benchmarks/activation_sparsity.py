"""Activation sparsity alone and on top of weight sparsity: perplexity cost and decode speed.

Protocol (printed with the figures): for each folder given as ``LABEL=PATH`` (a dense Hugging Face folder, or a
pruned one: ``secateurs prune ... --save-format sparse``), at each activation sparsity of ``--levels``:

- **perplexity** on the first ``--windows`` non-overlapping 512-token windows of the bundled Bible (the ``prune``
  protocol), each linear's input but the LM head's thresholded (``sparsify_activations``, thresholds from
  8 x 256 tokens of bundled Shakespeare, seed 0; computed with torch hooks, which the tests show equal to the
  kernel model);
- **decode speed** from ``secateurs.runtime.bench.benchmark`` (batch 1, random 64-token prompt, 32 greedy tokens,
  median of ``--repeat``, in one process and interleaved: the dense model, the same weights on the kernel
  without activation sparsity, and with it).

    python benchmarks/activation_sparsity.py dense=~/.cache/secateurs/smollm2-135m-instruct w50=out/w50 w70=out/w70
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import secateurs
from secateurs.measure import cpu_info, versions
from secateurs.runtime import bench


def perplexity(folder: Path, level: float, windows: int) -> float:
    model, tokenizer, _ = secateurs.load_model(str(folder), "float32")
    if level > 0:
        secateurs.sparsify_activations(model, level, tokenizer, kernel=False)
    return secateurs.evaluate(model, tokenizer, "bible", seqlen=512, max_windows=windows, progress=False).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", metavar="LABEL=PATH")
    parser.add_argument("--levels", default="0,0.25,0.4,0.5")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-speed", action="store_true", help="perplexity only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    levels = [float(v) for v in args.levels.split(",")]
    rows = []
    for spec in args.folders:
        label, _, path = spec.partition("=")
        folder = Path(path).expanduser()
        for level in levels:
            row = {"model": label, "activation_sparsity": level, "perplexity": perplexity(folder, level, args.windows)}
            if level > 0 and not args.no_speed:
                r = bench.benchmark(
                    folder, activation_sparsity=level, repeat=args.repeat, threads=args.threads, micro=False
                )
                row.update(
                    decode={k: r[k]["decode_tokens_per_s"] for k in ("dense", "weights_only", "sparse")},
                    vs_weights_only=r["speedup_decode_vs_weights_only"],
                    vs_dense=r["speedup_decode"],
                    prefill_vs_dense=r["speedup_prefill"],
                    skipped=r["conversion"]["activation"]["measured_on_first_window"],
                )
            rows.append(row)
            base = next((x for x in rows if x["model"] == label and x["activation_sparsity"] == 0), None)
            cost = f" ({row['perplexity'] / base['perplexity'] - 1:+.1%})" if base and level > 0 else ""
            speed = ""
            if "decode" in row:
                d = row["decode"]
                speed = (
                    f"; decode tok/s dense {d['dense']:.1f}, weights only {d['weights_only']:.1f}, "
                    f"+ activations {d['sparse']:.1f}: {row['vs_weights_only']:.2f}x weights only, "
                    f"{row['vs_dense']:.2f}x dense (prefill {row['prefill_vs_dense']:.2f}x)"
                )
            print(f"{label:6s} act {level:4.0%}: ppl {row['perplexity']:.3f}{cost}{speed}", flush=True)
    cpu = cpu_info()
    print(
        f"protocol: ppl on bible, first {args.windows} x 512-token windows; thresholds from 8 x 256 tokens of "
        f"shakespeare; decode batch 1, 64-token prompt, 32 tokens, median of {args.repeat}, interleaved; "
        f"{cpu.get('model')}, {torch.get_num_threads() if args.threads is None else args.threads} threads; "
        f"torch {torch.__version__}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "cpu": cpu, "versions": versions()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
