"""Decode tokens/s of SmolLM2-135M on the sparse CPU kernel against dense PyTorch, at 50 / 70 / 90% sparsity.

Protocol (printed with the table): for each sparsity the dense fp32 model is loaded and pruned with Wanda
(N seeded windows of L tokens of the bundled Shakespeare text; unstructured, per row), then saved as a sparse
checkpoint, whose bytes are reported (decoder linear weights packed vs dense; whole folder vs the same folder
written dense). For each dtype, ``secateurs bench`` (a fresh process each time) loads that folder twice,
dense (``load_pruned``) and sparse (``load_sparse``), same dtype and threads, and measures greedy decode
(T KV-cache steps after a random prompt of P tokens, batch 1; the T - 1 steps after the prefill timed),
prefill (one forward pass of the prompt), per-shape kernel vs ``F.linear`` times, and the bandwidth bound:
streaming read bandwidth (``sum`` over 256 MB, measured in the same run) x batch / weight bytes read per
decode step.

    python benchmarks/decode_smollm2.py --json benchmarks/results/decode_smollm2.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import secateurs
from secateurs import data
from secateurs.checkpoint import save_sparse
from secateurs.runtime import bench, kernels


def prune_and_save(model_name: str, sparsity: float, nsamples: int, seqlen: int, folder: Path) -> dict:
    model, tokenizer, _ = secateurs.load_model(model_name, "float32")
    windows = data.calibration_windows("shakespeare", tokenizer, nsamples, seqlen, seed=0)
    start = time.perf_counter()
    report = secateurs.prune(model, secateurs.Recipe(method="wanda", sparsity=sparsity), windows, progress=False)
    seconds = time.perf_counter() - start
    sizes = save_sparse(model, tokenizer, folder, report.to_dict(), overwrite=True, progress=False)
    # the same weights in bf16, for the bytes of a bf16 checkpoint
    bf16_folder = folder.with_name(folder.name + "-bf16")
    bf16 = save_sparse(model.to(torch.bfloat16), tokenizer, bf16_folder, overwrite=True, progress=False)
    del model
    gc.collect()
    return {"sparsity": report.sparsity, "prune_seconds": seconds, "bytes": {"float32": sizes, "bfloat16": bf16}}


def run_bench(folder: Path, dtype: str, args) -> dict:
    """``secateurs bench`` in a fresh process, so the resident memory it reports is that of its two models."""
    argv = [sys.executable, "-m", "secateurs", "bench", str(folder), "--json", "--quiet", "--dtype", dtype]
    argv += ["--tokens", str(args.tokens), "--prompt-len", str(args.prompt_len), "--batch", str(args.batch)]
    argv += ["--threads", str(args.threads), "--repeat", str(args.repeat), "--min-sparsity", "0"]
    argv += ["--no-micro"] if args.no_micro else []
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", default="0.5,0.7,0.9")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows for Wanda")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per greedy decode")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-micro", action="store_true", help="skip the per-shape microbenchmarks")
    parser.add_argument("--work-dir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write all figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="decode-smollm2-"))
    runs = []
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        folder = work / f"wanda-{round(sparsity * 100)}"
        pruned = prune_and_save(args.model, sparsity, args.nsamples, args.seqlen, folder)
        for dtype in args.dtypes.split(","):
            result = run_bench(folder, dtype, args)
            print(bench.format_table(result) + "\n", flush=True)
            runs.append({**pruned, "dtype": dtype, "bench": result})

    print(
        f"SmolLM2-135M ({args.model}), Wanda on {args.nsamples} x {args.seqlen} tokens of bundled Shakespeare "
        f"(seed 0); {args.threads} threads; kernel {kernels.isa()}; decode: batch {args.batch}, "
        f"{args.tokens} new tokens after a {args.prompt_len}-token random prompt, median of {args.repeat}"
    )
    header = (
        f"{'sparsity':>8} {'dtype':>9} {'linears':>8} {'folder':>7} {'dense tok/s':>12} {'sparse tok/s':>13} "
        f"{'speedup':>8} {'bound dense':>12} {'bound sparse':>13} {'bound x':>8} {'prefill x':>10} {'same':>5}"
    )
    print(header)
    for run in runs:
        b, size = run["bench"], run["bytes"][run["dtype"]]
        print(
            f"{run['sparsity']:>8.3f} {run['dtype']:>9} {size['linear_ratio']:>7.3f}x {size['folder_ratio']:>6.3f}x "
            f"{b['dense']['decode_tokens_per_s']:>12.2f} {b['sparse']['decode_tokens_per_s']:>13.2f} "
            f"{b['speedup_decode']:>7.2f}x {b['dense']['bandwidth_bound_tokens_per_s']:>12.1f} "
            f"{b['sparse']['bandwidth_bound_tokens_per_s']:>13.1f} {b['speedup_bandwidth_bound']:>7.2f}x "
            f"{b['speedup_prefill']:>9.2f}x {str(b['same_tokens']):>5}"
        )
    print(
        "linears: decoder linear weight bytes in the sparse checkpoint / dense; folder: whole sparse folder / "
        "the same folder written dense; bound: read bandwidth x batch / weight bytes per decode step"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
