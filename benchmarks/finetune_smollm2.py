"""How much of Wanda's perplexity loss on SmolLM2-135M a short mask-preserving fine-tune wins back.

Protocol (printed with the result): SmolLM2-135M-Instruct (the bundled default, fp32) is pruned with Wanda to 50%
unstructured (per row) on 32 seeded windows of 512 tokens of the bundled Shakespeare text (seed 0), saved with its
masks, then fine-tuned with ``secateurs.train.finetune`` for N AdamW steps (default 300; batch 1, seqlen 256,
windows of the Shakespeare text drawn as calibration windows are, seed 0; lr 2e-5 full / 2e-4 LoRA with 5% warmup
and linear decay to 10%; grad clip 1.0), full fine-tuning under the masks or LoRA merged through them (--lora R).
Perplexity on the held-out bundled Bible, the protocol of ``secateurs prune``: the first 40 non-overlapping windows
of 512 tokens (BOS when the tokenizer adds one), ppl = exp(mean NLL). Reported: dense, pruned and fine-tuned
perplexity, the fraction of the pruning loss recovered, (pruned - tuned) / (pruned - dense), whether every row's
zero count is unchanged (counted from the weights), wall time and peak memory.

    python benchmarks/finetune_smollm2.py --json benchmarks/results/finetune_smollm2.json
    python benchmarks/finetune_smollm2.py --lora 16 --json benchmarks/results/finetune_smollm2_lora16.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

import secateurs
from secateurs.checkpoint import save_pruned
from secateurs.data.calibration import Calibration
from secateurs.measure import versions
from secateurs.models import default_device
from secateurs.train.finetune import finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=32, help="Wanda calibration windows")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per training window")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=None, help="default 2e-5 full, 2e-4 LoRA")
    parser.add_argument("--lora", type=int, default=None, metavar="R", help="LoRA rank (default: full fine-tuning)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", default="bible")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", default="auto", help="N, all or auto (40 for bundled text)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--work-dir", default=None, help="where the pruned folder goes (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write all figures here")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    windows = {"auto": "auto", "all": None}[args.eval_windows] if args.eval_windows in ("auto", "all") else None
    windows = int(args.eval_windows) if args.eval_windows not in ("auto", "all") else windows
    device = default_device(args.device)

    start = time.perf_counter()
    model, tokenizer, desc = secateurs.load_model(args.model, "float32")
    model.to(device)
    ppl_args = dict(seqlen=args.eval_seqlen, max_windows=windows, progress=args.progress)
    dense = secateurs.evaluate(model, tokenizer, args.eval, **ppl_args)
    calibration = Calibration("shakespeare", args.nsamples, args.calib_seqlen, args.seed)
    recipe = secateurs.Recipe(method="wanda", sparsity=args.sparsity)
    prune_report = secateurs.prune(
        model, recipe, calibration, tokenizer=tokenizer, device=device, progress=args.progress
    )
    pruned = secateurs.evaluate(model, tokenizer, args.eval, **ppl_args)
    saved = {
        "model": desc,
        **prune_report.to_dict(),
        "perplexity": {"dense": dense.to_dict(), "pruned": pruned.to_dict()},
    }
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        folder = Path(tmp) / "wanda"
        model.to(torch.device("cpu"))
        save_pruned(model, tokenizer, folder, saved, masks=prune_report.mask_tensors())
        del model
        _, _, report = finetune(
            folder,
            data="shakespeare",
            steps=args.steps,
            seqlen=args.seqlen,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            lora=args.lora,
            eval_source=args.eval,
            eval_windows="all" if windows is None else windows,
            eval_seqlen=args.eval_seqlen,
            device=args.device,
            progress=args.progress,
        )
    wall = time.perf_counter() - start
    before, after = report["perplexity"]["before"], report["perplexity"]["after"]
    gap = pruned.perplexity - dense.perplexity
    recovered = (pruned.perplexity - after["perplexity"]) / gap if gap else float("nan")
    ft, check = report["finetune"], report["sparsity"]
    figures = {
        "model": desc,
        "dense_ppl": dense.perplexity,
        "pruned_ppl": pruned.perplexity,
        "pruned_ppl_reloaded": before["perplexity"],
        "finetuned_ppl": after["perplexity"],
        "recovered_fraction": recovered,
        "sparsity_before": check["overall_before"],
        "sparsity_after": check["overall_after"],
        "rows_unchanged": check["rows_unchanged"],
        "pruned_zero": check["pruned_zero"],
        "train_seconds": ft["train_seconds"],
        "wall_seconds": wall,
        "peak_rss_bytes": ft["peak_rss_bytes"],
        "peak_cuda_bytes": ft["peak_cuda_bytes"],
        "loss_first": ft["loss"]["mean_first"],
        "loss_last": ft["loss"]["mean_last"],
        "protocol": {
            "pruning": f"{recipe.label} {args.sparsity:.0%} unstructured, "
            f"calibration shakespeare {args.nsamples} x {args.calib_seqlen} seed {args.seed}",
            "finetune": f"{ft['mode']}{f' rank {args.lora}' if args.lora else ''}, {ft['windows']}, "
            f"AdamW lr {ft['lr']:g} ({ft['schedule']}), grad clip {ft['optimizer']['max_grad_norm']}, "
            f"{ft['tokens']} tokens",
            "evaluation": after["protocol"],
            "device": ft["device"],
        },
        "versions": versions(),
    }
    mem = f"peak RSS {ft['peak_rss_bytes'] / 2**30:.2f} GiB" + (
        f", peak CUDA {ft['peak_cuda_bytes'] / 2**30:.2f} GiB" if ft["peak_cuda_bytes"] else ""
    )
    print(f"model          {desc}")
    print(f"dense ppl      {dense.perplexity:.3f}")
    print(f"pruned ppl     {pruned.perplexity:.3f}  (reloaded {before['perplexity']:.3f})")
    print(f"fine-tuned ppl {after['perplexity']:.3f}  after {args.steps} steps")
    print(f"recovered      {recovered:.1%} of the pruning loss (pruned - tuned) / (pruned - dense)")
    print(
        f"sparsity       {check['overall_before']:.4f} -> {check['overall_after']:.4f}; every row's zero count "
        f"unchanged: {check['rows_unchanged']}; pruned positions all zero: {check['pruned_zero']}"
    )
    print(f"loss           {ft['loss']['mean_first']:.3f} -> {ft['loss']['mean_last']:.3f} (mean of first/last 10)")
    print(f"time           {ft['train_seconds']:.1f} s training, {wall:.1f} s wall; {mem}")
    for key, text in figures["protocol"].items():
        print(f"protocol       {key}: {text}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**figures, "finetune_report": report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
