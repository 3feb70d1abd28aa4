"""DSnoT's variants and OWL on the embedded default model: every refinement x method x pattern x allocation, with
several calibration seeds where seed noise is large.

Protocol (printed with the table): SmolLM2-135M-Instruct in fp32; calibration = 32 seeded windows of 512 tokens of
the bundled Shakespeare text (seed 0, and the seeds of ``--seeds`` for the patterns of ``--seeded-patterns``);
evaluation = the first 40 non-overlapping 512-token windows of the bundled World English Bible, no BOS, batch 1,
ppl = exp(mean NLL): the protocol of ``prune_smollm2.py``. Each row reloads the dense model. Rows are appended to
``--out`` (JSON lines) as they finish and a rerun skips the rows already there, so a stopped study continues.

    python benchmarks/dsnot_owl.py --out benchmarks/results/dsnot_owl.jsonl
    python benchmarks/dsnot_owl.py --out benchmarks/results/dsnot_owl.jsonl --table   # the table only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import secateurs
from secateurs import data
from secateurs.api import LOCAL_EVAL_WINDOWS
from secateurs.evaluate.perplexity import eval_windows, perplexity
from secateurs.models import load_model

ALLOCATIONS = {"uniform": "uniform", "owl": "owl", "owl-auto": {"name": "owl", "lam": "auto"}}
REFINES = {
    "none": None,
    "secateurs": {"name": "dsnot", "variant": "secateurs"},
    "reference": {"name": "dsnot", "variant": "reference"},
}


def cells(args) -> list[dict]:
    out = []
    for seed in [0] + [s for s in args.seeds if s != 0]:
        for pattern in args.patterns:
            if seed != 0 and pattern not in args.seeded_patterns:
                continue
            for method in args.methods:
                for allocation in args.allocations:
                    if allocation == "owl" and pattern == "2:4":
                        continue  # OWL's N_l = round(4 * s_l) is 2 for every layer at lambda <= 0.12: uniform 2:4
                    for refine in args.refines:
                        out.append(
                            {
                                "seed": seed,
                                "pattern": pattern,
                                "method": method,
                                "allocation": allocation,
                                "refine": refine,
                            }  # fmt: skip
                        )
    return out


def key(cell: dict) -> str:
    return json.dumps({k: cell[k] for k in ("seed", "pattern", "method", "allocation", "refine")}, sort_keys=True)


def run_cell(cell: dict, args, evaluation) -> dict:
    model, tokenizer, _ = load_model(args.model, "float32")
    calib = data.calibration_windows("shakespeare", tokenizer, args.nsamples, args.seqlen, seed=cell["seed"])
    nm = ":" in cell["pattern"]
    recipe = secateurs.Recipe(
        method=cell["method"],
        pattern=cell["pattern"] if nm else None,
        sparsity=0.5 if nm else float(cell["pattern"]),
        allocation=ALLOCATIONS[cell["allocation"]],
        refine=REFINES[cell["refine"]],
    )
    start = time.perf_counter()
    report = secateurs.prune(model, recipe, calib, progress=False)
    seconds = time.perf_counter() - start
    ppl = perplexity(model, evaluation, progress=False).perplexity
    swaps = sum(lin["info"].get("dsnot", {}).get("swaps", 0) for lin in report.linears)
    errors = [layer["output_error"] for layer in report.layers if layer["output_error"] is not None]
    return {
        **cell,
        "perplexity": ppl,
        "prune_seconds": seconds,
        "swaps": swaps,
        "mean_output_error": sum(errors) / len(errors) if errors else None,
        "sparsity": report.sparsity,
        "recipe": report.recipe,
        "allocation_search": report.allocation_search,
        "protocol": protocol(args),
    }


def protocol(args) -> dict:
    """What a row's figures depend on besides its cell; stored in every row so the table states its own protocol."""
    return {
        "model": args.model,
        "threads": args.threads,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "eval_windows": args.eval_windows,
    }


def table(rows: list[dict], dense: float | None, field: str = "perplexity") -> str:
    """Per method x pattern x allocation: ``field`` (perplexity, or prune_seconds) without DSnoT and with each
    variant, mean +- sd over seeds."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["pattern"], r["allocation"]), {}).setdefault(r["refine"], []).append(r[field])
    refines = [r for r in REFINES if any(r in g for g in groups.values())]
    lines = [
        f"dense perplexity: {dense:.3f}" if dense and field == "perplexity" else f"{field}:",
        "| method | pattern | allocation | " + " | ".join(f"{r} (seeds)" for r in refines) + " |",
        "|---|---|---|" + "---|" * len(refines),
    ]
    for (method, pattern, allocation), by in sorted(groups.items()):
        shown = []
        for r in refines:
            v = by.get(r, [])
            if not v:
                shown.append("")
            elif len(v) == 1:
                shown.append(f"{v[0]:.2f} (1)")
            else:
                shown.append(f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f} ({len(v)})")
        lines.append(f"| {method} | {pattern} | {allocation} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True, help="JSON lines, appended; rows already there are skipped")
    parser.add_argument("--methods", default="wanda,sparsegpt", type=lambda s: s.split(","))
    parser.add_argument("--patterns", default="0.7,0.6,2:4", type=lambda s: s.split(","))
    parser.add_argument(
        "--allocations", default="uniform,owl", type=lambda s: s.split(","), help="of: uniform, owl, owl-auto"
    )
    parser.add_argument("--refines", default="none,secateurs,reference", type=lambda s: s.split(","))
    parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--seeded-patterns", default="0.7", type=lambda s: s.split(","))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=LOCAL_EVAL_WINDOWS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--shard",
        default="0/1",
        type=lambda s: tuple(int(x) for x in s.split("/")),
        help="I/N: run every N-th cell from the I-th (several processes, one thread each, share one --out)",
    )
    parser.add_argument("--table", action="store_true", help="print the table of what --out holds, run nothing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            done[row.get("key", "dense")] = row
    dense = done.get("dense", {}).get("perplexity")
    if not args.table:
        out.parent.mkdir(parents=True, exist_ok=True)
        model, tokenizer, desc = load_model(args.model, "float32")
        evaluation = eval_windows(data.evaluation_tokens("bible", tokenizer), args.seqlen, None, args.eval_windows)
        if dense is None:
            dense = perplexity(model, evaluation, progress=False).perplexity
            with out.open("a") as f:
                row = {"key": "dense", "perplexity": dense, "model": desc, "protocol": protocol(args)}
                f.write(json.dumps(row) + "\n")
                done["dense"] = row
        del model
        index, count = args.shard
        todo = [c for i, c in enumerate(cells(args)) if key(c) not in done and i % count == index]
        for i, cell in enumerate(todo):
            row = {"key": key(cell), **run_cell(cell, args, evaluation)}
            done[row["key"]] = row
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"[{i + 1}/{len(todo)}] {cell}: ppl {row['perplexity']:.3f}, {row['prune_seconds']:.0f} s, "
                f"{row['swaps']} swaps",
                flush=True,
            )
    rows = [r for k, r in done.items() if k != "dense"]
    # the protocol is the rows' own (older rows without one are counted as the arguments given)
    seen = {json.dumps(r.get("protocol", protocol(args)), sort_keys=True) for r in done.values()}
    if len(seen) > 1:
        print(f"warning: {args.out} mixes {len(seen)} protocols: {sorted(seen)}")
    p = json.loads(sorted(seen)[0]) if seen else protocol(args)
    print(
        f"\nProtocol: {p['model']} fp32, {p['threads']} threads; calibration {p['nsamples']} x {p['seqlen']} tokens "
        f"of bundled:shakespeare (seeds as counted); evaluation: first {p['eval_windows']} non-overlapping "
        f"{p['seqlen']}-token windows of bundled:bible, no BOS; DSnoT at its defaults (cycles 50, threshold 0.1, "
        "power 1); OWL M 5, lambda 0.08; owl-auto: lambda from {0, .04, .08, .12} by held-out perplexity\n"
    )
    print(table(rows, dense))
    print()
    print(table(rows, dense, "prune_seconds"))


if __name__ == "__main__":
    main()
