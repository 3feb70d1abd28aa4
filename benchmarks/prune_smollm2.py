"""Quality, time and memory of every method on the embedded default model (SmolLM2-135M-Instruct, fp32).

Protocol (printed with the table): calibration = N seeded windows of L tokens from the bundled Shakespeare
text; evaluation = the first E non-overlapping L-token windows of the bundled World English Bible text, no
BOS (SmolLM2's tokenizer adds none). For each method x pattern the dense model is reloaded, pruned, and
scored. The Wanda cost is also given as a ratio to one dense forward pass of the calibration windows,
measured in the same run. ``--windows-out`` writes the exact token windows for the llm-compressor peer.

    python benchmarks/prune_smollm2.py --json benchmarks/results/prune_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from safetensors.torch import save_file

import secateurs
from secateurs import data
from secateurs.api import LOCAL_EVAL_WINDOWS
from secateurs.evaluate.perplexity import eval_windows, perplexity
from secateurs.models import load_model
from secateurs.report import versions


def dense_forward_seconds(model, windows: torch.Tensor) -> float:
    """One dense forward pass of every calibration window, batch 1 (the baseline for the walk's cost)."""
    start = time.perf_counter()
    with torch.no_grad():
        for row in windows:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--patterns", default="0.5,0.7,2:4")
    parser.add_argument("--allocations", default="uniform", help="comma list of: uniform, owl")
    parser.add_argument("--refines", default="none", help="comma list of: none, dsnot")
    parser.add_argument("--dsnot-cycles", type=int, default=50)
    parser.add_argument("--dsnot-threshold", type=float, default=0.1)
    parser.add_argument("--dsnot-power", type=float, default=1.0)
    parser.add_argument("--dsnot-targets", default="", help="comma list of linear-name globs (default: all)")
    parser.add_argument("--owl-m", type=float, default=5.0)
    parser.add_argument("--owl-lambda", type=float, default=0.08)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=LOCAL_EVAL_WINDOWS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write all figures here")
    parser.add_argument("--windows-out", default=None, help="write the token windows (safetensors) for the peer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer, desc = load_model(args.model, "float32")
    calib = data.calibration_windows("shakespeare", tokenizer, args.nsamples, args.seqlen, seed=0)
    evaluation = eval_windows(data.evaluation_tokens("bible", tokenizer), args.seqlen, None, args.eval_windows)
    protocol = (
        f"{desc}, fp32, {args.threads} threads; calibration: {args.nsamples} windows x {args.seqlen} tokens "
        f"from bundled:shakespeare, seed 0; evaluation: first {len(evaluation)} non-overlapping "
        f"{args.seqlen}-token windows of bundled:bible, no BOS, batch 1, ppl = exp(mean NLL)"
    )
    if args.windows_out:
        save_file(
            {"calibration": calib.contiguous(), "evaluation": evaluation.contiguous()},
            args.windows_out,
            metadata={"protocol": protocol},
        )

    forward_s = dense_forward_seconds(model, calib)
    dense_ppl = perplexity(model, evaluation, progress=False).perplexity
    rows = [{"method": "dense", "pattern": "-", "perplexity": dense_ppl}]
    print(f"dense: ppl {dense_ppl:.3f}; one forward pass of the calibration windows: {forward_s:.1f} s", flush=True)
    grid = [
        (method, pattern, allocation, refine)
        for method in args.methods.split(",")
        for allocation in args.allocations.split(",")
        for pattern in args.patterns.split(",")
        for refine in args.refines.split(",")
    ]
    for method, pattern, allocation, refine in grid:
        model, tokenizer, _ = load_model(args.model, "float32")
        nm = ":" in pattern
        recipe = secateurs.Recipe(
            method=method,
            pattern=pattern if nm else None,
            sparsity=0.5 if nm else float(pattern),
            allocation=allocation,
            owl_m=args.owl_m,
            owl_lambda=args.owl_lambda,
            refine=refine,
            dsnot_cycles=args.dsnot_cycles,
            dsnot_threshold=args.dsnot_threshold,
            dsnot_power=args.dsnot_power,
            dsnot_targets=[t for t in args.dsnot_targets.split(",") if t],
        )
        report = secateurs.prune(model, recipe, calib, progress=False)
        ppl = perplexity(model, evaluation, progress=False).perplexity
        name = method if allocation == "uniform" else f"{allocation}(M {args.owl_m:g}, λ {args.owl_lambda:g})-{method}"
        if recipe.refine:
            name += f" + DSnoT(T {args.dsnot_cycles}, thr {args.dsnot_threshold:g}, p {args.dsnot_power:g}"
            name += f", {args.dsnot_targets})" if args.dsnot_targets else ")"
        row = {
            "method": name,
            "pattern": pattern,
            "perplexity": ppl,
            "prune_seconds": report.prune_seconds,
            "forward_ratio": report.prune_seconds / forward_s,
            "peak_rss_mb": report.peak_rss_bytes / 2**20,
            "rss_growth_mb": (report.peak_rss_bytes - report.rss_before_bytes) / 2**20,
            "sparsity": report.sparsity,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model

    print(f"\nProtocol: {protocol}")
    print(f"One dense forward pass of the calibration windows: {forward_s:.1f} s\n")
    print("| method | pattern | perplexity | prune s | x dense forward | peak RSS MB | RSS growth MB | sparsity |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] == "dense":
            print(f"| dense | - | {r['perplexity']:.2f} | | | | | |")
        else:
            print(
                f"| {r['method']} | {r['pattern']} | {r['perplexity']:.2f} | {r['prune_seconds']:.1f} | "
                f"{r['forward_ratio']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} | {r['sparsity']:.4f} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"protocol": protocol, "dense_forward_seconds": forward_s, "rows": rows, "versions": versions()},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
