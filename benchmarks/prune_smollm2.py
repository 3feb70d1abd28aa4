"""Quality, time, memory and layer error of every recipe on the embedded default model (SmolLM2-135M, fp32).

Protocol (printed with the table): calibration = N seeded windows of L tokens from the bundled Shakespeare
text; evaluation = the first E non-overlapping L-token windows of the bundled World English Bible text, no
BOS (SmolLM2's tokenizer adds none). For each method x pattern x allocation x refinement x update the dense
model is reloaded, pruned, and scored; "layer error" is the mean over decoder layers of the relative output
reconstruction error ||Y_sparse - Y_dense||^2 / ||Y_dense||^2 on the calibration inputs. The cost is also
given as a ratio to one dense forward pass of the calibration windows, measured in the same run.
``--windows-out`` writes the exact token windows for the llm-compressor peer.

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
from secateurs.cli.stages import add_stage_settings, given_settings
from secateurs.evaluate.perplexity import eval_windows, perplexity
from secateurs.measure import versions
from secateurs.models import load_model


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
    parser.add_argument("--updates", default="none", help="comma list of: none, sparsegpt, admm")
    add_stage_settings(parser)  # --owl-m, --dsnot-cycles, --admm-iterations ...: the same flags as secateurs prune
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
    settings = given_settings(args)
    grid = [
        (method, pattern, allocation, refine, update)
        for method in args.methods.split(",")
        for allocation in args.allocations.split(",")
        for pattern in args.patterns.split(",")
        for refine in args.refines.split(",")
        for update in args.updates.split(",")
    ]
    for method, pattern, allocation, refine, update in grid:
        model, tokenizer, _ = load_model(args.model, "float32")
        nm = ":" in pattern
        chosen = {"method": method, "allocation": allocation, "refine": refine, "update": update}
        recipe = secateurs.Recipe.from_dict(
            {
                **chosen,
                "pattern": pattern if nm else None,
                "sparsity": 0.5 if nm else float(pattern),
                "options": {k: settings[v] for k, v in chosen.items() if v in settings},
            }
        )
        report = secateurs.prune(model, recipe, calib, progress=False)
        ppl = perplexity(model, evaluation, progress=False).perplexity
        name = " + ".join(
            [method if allocation == "uniform" else f"{allocation}-{method}"]
            + [
                f"{st.name}({', '.join(f'{k} {v}' for k, v in st.options().items() if v not in ((), []))})"
                for st in (recipe.refine, recipe.update)
                if st
            ]
        )
        errors = [layer["output_error"] for layer in report.layers if layer["output_error"] is not None]
        row = {
            "method": name,
            "pattern": pattern,
            "perplexity": ppl,
            "prune_seconds": report.prune_seconds,
            "forward_ratio": report.prune_seconds / forward_s,
            "peak_rss_mb": report.peak_rss_bytes / 2**20,
            "rss_growth_mb": (report.peak_rss_bytes - report.rss_before_bytes) / 2**20,
            "sparsity": report.sparsity,
            "mean_output_error": sum(errors) / len(errors) if errors else None,
            "recipe": report.recipe,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model

    print(f"\nProtocol: {protocol}")
    print(f"One dense forward pass of the calibration windows: {forward_s:.1f} s\n")
    print(
        "| method | pattern | perplexity | prune s | x dense forward | peak RSS MB | RSS growth MB | sparsity | "
        "layer error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] == "dense":
            print(f"| dense | - | {r['perplexity']:.2f} | | | | | |")
        else:
            print(
                f"| {r['method']} | {r['pattern']} | {r['perplexity']:.2f} | {r['prune_seconds']:.1f} | "
                f"{r['forward_ratio']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} | {r['sparsity']:.4f} | "
                f"{'' if r['mean_output_error'] is None else format(r['mean_output_error'], '.4f')} |"
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
