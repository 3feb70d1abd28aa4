"""What keeping a model sparse costs per training step, and in memory, against the same dense training.

Protocol (printed with the figures): an MLP (inputs -> width -> width -> width -> 10, ReLU) trained with SGD
(momentum 0.9, weight decay 5e-4) on random batches, fp32. Each method runs on its own copy of the model, all in
one process, interleaved: ``--rounds`` rounds, each of which runs every method for ``--warmup`` untimed then
``--steps`` timed optimizer steps (forward, backward, ``optimizer.step()``, ``sparse.step()``; CUDA synchronised
before the clock is read). The figure is the median over rounds of the mean step time, and its ratio to dense.
Methods: dense; static (a fixed 90% ERK mask: gradient masking in the optimizer pre-hook, mask re-applied after
the step); RigL 90% (mask updates every ``--interval`` steps, so the timed steps include updates at that rate; the
update step's own time is also given); SR-STE 2:4 (a parametrization recomputing the mask at every forward).
Memory: bytes of masks SparseTraining holds, and on CUDA the peak allocated memory of a step for each method
(torch.cuda.max_memory_allocated, reset before each method's steps) against dense.

    python benchmarks/train_overhead.py                      # CPU (2 threads here)
    python benchmarks/train_overhead.py --device cuda --width 4096 --batch 1024
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from secateurs.measure import versions
from secateurs.train import SRSTE, RigL, SparseTraining, Static


def build(inputs: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(inputs, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inputs", type=int, default=784)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=int, default=10, help="RigL: steps between mask updates")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    base = build(args.inputs, args.width)
    total = args.rounds * (args.warmup + args.steps) + 1
    runs = {}
    for name in ("dense", "static 90%", "rigl 90%", "srste 2:4"):
        model = copy.deepcopy(base).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        sparse = None
        if name.startswith("static"):
            sparse = SparseTraining(model, opt, Static(), sparsity=0.9, total_steps=total)
        elif name.startswith("rigl"):
            sparse = SparseTraining(model, opt, RigL(interval=args.interval, end=1.0), sparsity=0.9, total_steps=total)
        elif name.startswith("srste"):
            sparse = SparseTraining(model, opt, SRSTE(), pattern="2:4", total_steps=total, exclude=["6"])
        runs[name] = {"model": model, "opt": opt, "sparse": sparse, "means": [], "update_times": [], "peak": 0}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.inputs, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)

    def one_step(run) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        run["opt"].zero_grad(set_to_none=True)
        nn.functional.cross_entropy(run["model"](x), y).backward()
        run["opt"].step()
        record = run["sparse"].step() if run["sparse"] is not None else None
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if record is not None:
            run["update_times"].append(dt)
        return dt

    for _ in range(args.rounds):
        for run in runs.values():
            for _ in range(args.warmup):
                one_step(run)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            run["means"].append(sum(one_step(run) for _ in range(args.steps)) / args.steps)
            if cuda:
                run["peak"] = max(run["peak"], torch.cuda.max_memory_allocated())
    dense = statistics.median(runs["dense"]["means"])
    params = sum(p.numel() for p in base.parameters())
    print(
        f"protocol: MLP {args.inputs}-{args.width}-{args.width}-{args.width}-10 ({params / 1e6:.1f} M parameters), "
        f"batch {args.batch}, fp32, SGD momentum 0.9 wd 5e-4, {args.device}"
        + ("" if cuda else f" ({torch.get_num_threads()} threads)")
        + f"; {args.rounds} interleaved rounds x ({args.warmup} warm-up + {args.steps} timed steps); "
        f"median of round means; RigL updates every {args.interval} steps"
    )
    figures = {"protocol": vars(args), "parameters": params, "versions": versions(), "methods": {}}
    for name, run in runs.items():
        t = statistics.median(run["means"])
        sparse = run["sparse"]
        mask_bytes = sparse.mask_bytes() if sparse is not None else 0
        update = statistics.median(run["update_times"]) if run["update_times"] else None
        row = {
            "step_ms": t * 1e3,
            "ratio": t / dense,
            "update_step_ms": update * 1e3 if update else None,
            "mask_bytes": mask_bytes,
            "sparsity": sparse.overall_sparsity() if sparse is not None else 0.0,
            "peak_cuda_bytes": run["peak"] if cuda else None,
        }
        figures["methods"][name] = row
        extra = f"; update step {update * 1e3:.2f} ms" if update else ""
        mem = f"; peak CUDA {run['peak'] / 2**20:.1f} MiB" if cuda else ""
        print(
            f"{name:11s} {t * 1e3:8.2f} ms/step  {t / dense:5.2f}x dense  "
            f"masks {mask_bytes / 2**20:6.2f} MiB{mem}{extra}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
