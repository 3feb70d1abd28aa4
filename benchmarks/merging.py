"""Merging models fine-tuned from one base, and their sparse deltas, on real images (scikit-learn's 8x8 digits).

One MLP body (64-H-H, ReLU) is pre-trained on a pretext that uses no digit labels (which of 4 rotations was applied
to an image); three copies are fine-tuned, body and a fresh head each, on three tasks: A = digits 0-4 (5 classes),
B = digits 5-9 (5 classes), C = parity of all digits (2 classes). Task arithmetic needs one shared set of weights,
but the heads differ in size and meaning, so, as is usual, only the body is merged and each task keeps its own head.

Prints, per task, the test accuracy of: each fine-tuned model; plain averaging; task arithmetic, TIES, DARE + TA
and DARE + TIES (lambda picked on a labelled validation split, the mean over tasks); AdaMerging task-wise and
layer-wise (coefficients learned on the unlabelled test inputs, as in the paper). Then, per task, the body delta
DARE'd at p = 0.9 and 0.99: bytes of the saved compact delta against the same delta dense, and the accuracy of
base + delta, with DARE's 1/(1-p) and with DAREx-q's 1/q (q chosen on one unlabelled training batch by the
smallest mean logit change), over several mask seeds.

    python benchmarks/merging.py                        # 3 seeds, under a minute on one core
    python benchmarks/merging.py --seeds 0 --hidden 1024
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from secateurs.merge import (
    DARE,
    TIES,
    AdaMerging,
    Average,
    TaskArithmetic,
    adamerge,
    add,
    choose_q,
    dare,
    drop,
    float_tensors,
    forward,
    make_delta,
    merge,
    output_change,
    q_grid,
    save_delta,
    task_vector,
)
from secateurs.train.data import digits, stratified_split

TASKS = {  # name: (which images, their label, classes)
    "A: digits 0-4": (lambda y: y < 5, lambda y: y, 5),
    "B: digits 5-9": (lambda y: y >= 5, lambda y: y - 5, 5),
    "C: parity": (lambda y: y >= 0, lambda y: y % 2, 2),
}


class Net(nn.Module):
    """A body shared by every task and a task's own head."""

    def __init__(self, hidden: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train(model: nn.Module, x, y, *, epochs: int, lr: float, batch: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch):
            rows = order[i : i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            opt.step()
    model.eval()


def accuracy(model: nn.Module, body: dict, x, y) -> float:
    """Test accuracy (%) of ``model`` with ``body`` in place of its own body tensors (its own head)."""
    with torch.no_grad():
        return 100 * (forward(model, body, x).argmax(1) == y).float().mean().item()


def rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    images = x.view(-1, 8, 8)
    rotated = torch.cat([torch.rot90(images, k, (1, 2)).reshape(-1, 64) for k in range(4)])
    return rotated, torch.arange(4).repeat_interleave(len(x))


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f}"


GRID = [round(0.1 * i, 1) for i in range(1, 16)]


def run(args, seed: int) -> dict:
    """One seed: pre-train, fine-tune, merge every way, DARE the deltas; accuracies (%) per method and task."""
    t0 = time.perf_counter()
    data = digits(seed=seed)
    x_all, y_all = data.train_x.flatten(1), data.train_y
    fit_rows, val_rows = stratified_split(y_all.numpy(), 0.2, seed)
    x_fit, y_fit, x_val, y_val = x_all[fit_rows], y_all[fit_rows], x_all[val_rows], y_all[val_rows]
    x_test, y_test = data.test_x.flatten(1), data.test_y

    # ---------------------------------------------------------------- base: a pretext that uses no digit labels
    torch.manual_seed(seed)
    base = Net(args.hidden, 4)
    rx, ry = rotations(x_fit)
    train(base, rx, ry, epochs=args.pretext_epochs, lr=0.05, batch=64, seed=seed)
    pretext_acc = accuracy(base, {}, *rotations(x_test))
    base_body = {k: v for k, v in float_tensors(base).items() if k.startswith("body.")}

    # ---------------------------------------------------------------- fine-tune a copy per task (body + new head)
    models, splits = {}, {}
    for t, (name, (select, label, classes)) in enumerate(TASKS.items()):
        torch.manual_seed(seed * 100 + t + 1)
        model = Net(args.hidden, classes)
        model.body.load_state_dict(base.body.state_dict())
        rows = select(y_fit)
        train(model, x_fit[rows], label(y_fit[rows]), epochs=args.finetune_epochs, lr=args.lr, batch=32, seed=t)
        models[name] = model
        splits[name] = {
            split: (x[select(y)], label(y[select(y)]))
            for split, (x, y) in {"fit": (x_fit, y_fit), "val": (x_val, y_val), "test": (x_test, y_test)}.items()
        }
    names = list(TASKS)
    bodies = {n: {k: v for k, v in float_tensors(models[n]).items() if k.startswith("body.")} for n in names}
    vectors = [task_vector(base_body, bodies[n]) for n in names]
    heads = [{k: v for k, v in float_tensors(models[n]).items() if k.startswith("head.")} for n in names]
    train_seconds = time.perf_counter() - t0

    def scores(body: dict, split: str = "test") -> list[float]:
        return [accuracy(models[n], body, *splits[n][split]) for n in names]

    rows = {"fine-tuned (each its own body)": [accuracy(models[n], {}, *splits[n]["test"]) for n in names]}
    rows["base body (lambda 0) + each task's head"] = scores(base_body)
    rows["average"] = scores(merge(base_body, vectors, Average()))
    lams = {}

    def tuned(label: str, make) -> None:
        """Pick lambda on the validation split (mean over tasks), report the test accuracy."""
        best = max(GRID, key=lambda lam: statistics.mean(scores(merge(base_body, vectors, make(lam)), "val")))
        rows[label] = scores(merge(base_body, vectors, make(best)))
        lams[label] = best

    p = args.merge_drop
    tuned("task arithmetic", lambda lam: TaskArithmetic(lam=lam))
    tuned("TIES k=0.2", lambda lam: TIES(k=0.2, lam=lam))
    tuned(f"DARE+TA p={p:g}", lambda lam: TaskArithmetic(lam=lam, dare=DARE(drop=p, seed=0)))
    tuned(f"DARE+TIES p={p:g}", lambda lam: TIES(k=1.0, lam=lam, dare=DARE(drop=p, seed=0)))
    inputs = [splits[n]["test"][0] for n in names]  # unlabelled test inputs, as AdaMerging does
    coefficients = {}
    for granularity in ("task", "layer"):
        config = AdaMerging(granularity=granularity, steps=args.adamerging_steps, seed=seed)
        result = adamerge(models[names[0]], base_body, vectors, inputs, config, task_tensors=heads)
        rows[f"AdaMerging {granularity}-wise"] = scores(result.tensors)
        coefficients[granularity] = (result.names, result.coefficients.tolist())
    merge_seconds = time.perf_counter() - t0 - train_seconds

    # ---------------------------------------------------------------- sparse deltas: bytes and what they keep
    deltas = []
    with tempfile.TemporaryDirectory() as tmp:
        for t, n in enumerate(names):
            model, test = models[n], splits[n]["test"]
            x_batch = splits[n]["fit"][0][:64]  # one unlabelled training batch for DAREx-q
            for p in args.drops:
                for mask_seed in args.dare_seeds:
                    folder = Path(tmp) / f"{t}-{p}-{mask_seed}"
                    sizes = save_delta(make_delta(base_body, vectors[t], DARE(drop=p, seed=mask_seed)), folder)
                    dropped = drop(vectors[t], p, mask_seed)
                    change = output_change(model, base_body, bodies[n], dropped, [x_batch])
                    q, _ = choose_q(change, q_grid(p))
                    deltas.append(
                        {
                            "task": n,
                            "p": p,
                            "sizes": sizes,
                            "dare": accuracy(model, add(base_body, dare(vectors[t], p, mask_seed)), *test),
                            "darex": accuracy(model, add(base_body, dropped, 1 / q), *test),
                            "q": q,
                        }
                    )
    return {
        "names": names,
        "rows": rows,
        "lams": lams,
        "coefficients": coefficients,
        "deltas": deltas,
        "pretext": pretext_acc,
        "sizes": (len(fit_rows), len(val_rows), len(y_test)),
        "body_params": sum(v.numel() for v in base_body.values()),
        "seconds": (train_seconds, merge_seconds, time.perf_counter() - t0 - train_seconds - merge_seconds),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512, help="body width H (default 512)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of whole runs: split, weights, order (default 0,1,2)")
    ap.add_argument("--pretext-epochs", type=int, default=5)
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.01, help="fine-tuning SGD learning rate (momentum 0.9)")
    ap.add_argument("--adamerging-steps", type=int, default=500)
    ap.add_argument("--drops", default="0.9,0.99", help="DARE drop rates for the delta table")
    ap.add_argument("--merge-drop", type=float, default=0.9, help="DARE drop rate in DARE + TA / TIES")
    ap.add_argument("--dare-seeds", default="0,1,2", help="mask seeds for the delta table")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the matrices are small, and 2 threads stall "
        "when the cores are shared; the figures are the same)",
    )
    args = ap.parse_args()
    args.drops = [float(p) for p in args.drops.split(",")]
    args.dare_seeds = [int(s) for s in args.dare_seeds.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = [run(args, seed) for seed in seeds]
    first = runs[0]
    names = first["names"]
    fit, val, test = first["sizes"]

    print(
        f"Protocol: scikit-learn digits (1797 8x8 images), stratified split per seed: {fit} fit / {val} validation / "
        f"{test} test images. MLP body 64-{args.hidden}-{args.hidden} (ReLU), {first['body_params']:,} parameters; "
        f"base pre-trained on 4-way rotation prediction of the fit images ({args.pretext_epochs} epochs, SGD lr "
        f"0.05, momentum 0.9, batch 64; pretext test accuracy "
        f"{mean_std([r['pretext'] for r in runs])}%). Each task fine-tunes body + a fresh head on its fit images "
        f"({args.finetune_epochs} epochs, SGD lr {args.lr:g}, momentum 0.9, batch 32, fp32). Only the body is "
        f"merged; each task keeps its own head. lambda grid {GRID[0]:g}..{GRID[-1]:g} step 0.1, picked by the mean "
        f"validation accuracy over tasks; DARE in merges: p = {args.merge_drop:g}, mask seed 0 (task t's own "
        f"masks), DARE+TIES without trim (k = 1). AdaMerging: lambdas from 0.3, clamped to [0, 1], Adam lr 1e-3, "
        f"{args.adamerging_steps} steps, 16 unlabelled test images per task per step, summed mean entropy. "
        f"Seeds {args.seeds} (mean +- std over them); {torch.get_num_threads()} thread(s)."
    )
    print()
    labels = list(first["rows"])
    width = max(len(label) for label in labels) + 2
    print(f"{'test accuracy (%)':<{width}}" + "".join(f"{n:>16}" for n in names) + f"{'mean':>15}{'lambda':>14}")
    for label in labels:
        cells = [mean_std([r["rows"][label][i] for r in runs]) for i in range(len(names))]
        mean = mean_std([statistics.mean(r["rows"][label]) for r in runs])
        lam = ",".join(f"{r['lams'][label]:g}" for r in runs) if label in first["lams"] else ""
        print(f"{label:<{width}}" + "".join(f"{c:>16}" for c in cells) + f"{mean:>15}{lam:>14}")
    print()
    for r, seed in zip(runs, seeds, strict=True):
        _, task_lams = r["coefficients"]["task"]
        layer_names, layer = r["coefficients"]["layer"]
        print(
            f"seed {seed}: AdaMerging task-wise lambdas "
            + ", ".join(f"{n.split(':')[0]} {v:.3f}" for n, v in zip(names, task_lams, strict=True))
            + "; layer-wise (A/B/C) "
            + "; ".join(f"{k} " + "/".join(f"{v:.2f}" for v in row) for k, row in zip(layer_names, layer, strict=True))
        )
    print()
    print(
        f"Body deltas (fine-tuned - base, {first['body_params']:,} entries each) DARE'd and saved in the compact "
        f"format (weights as 1-bit mask + fp32 values, biases dense); kept = stored non-zero entries / all; accuracy "
        f"of base + delta with the task's own head; mean +- std over mask seeds {','.join(map(str, args.dare_seeds))}"
        f" x run seeds {args.seeds}. DAREx-q: q on {len(q_grid(0.9))} points geometric in [1-p, 1], chosen by the "
        f"smallest mean |logit change| against the fine-tuned model on 64 unlabelled fit images of the task; same "
        f"masks as DARE."
    )
    header = f"{'task':<16}{'p':>6}{'kept':>8}{'delta bytes':>13}{'dense bytes':>13}{'ratio':>8}"
    print(header + f"{'DARE acc':>16}{'DAREx-q acc':>16}{'q (mean)':>10}{'fine-tuned':>14}")
    for n in names:
        own = mean_std([r["rows"]["fine-tuned (each its own body)"][names.index(n)] for r in runs])
        for p in args.drops:
            cells = [d for r in runs for d in r["deltas"] if d["task"] == n and d["p"] == p]
            sizes = [d["sizes"] for d in cells]
            print(
                f"{n:<16}{p:>6g}{statistics.mean(s['kept_fraction'] for s in sizes):>8.4f}"
                f"{round(statistics.mean(s['delta_file_bytes'] for s in sizes)):>13,}"
                f"{sizes[0]['dense_delta_bytes']:>13,}{statistics.mean(s['delta_ratio'] for s in sizes):>8.4f}"
                f"{mean_std([d['dare'] for d in cells]):>16}{mean_std([d['darex'] for d in cells]):>16}"
                f"{statistics.mean(d['q'] for d in cells):>10.4f}{own:>14}"
            )
    print()
    totals = [sum(r["seconds"][i] for r in runs) for i in range(3)]
    print(
        f"seconds: training {totals[0]:.0f}, merging {totals[1]:.0f}, deltas {totals[2]:.0f}; "
        f"total {time.perf_counter() - t0:.0f}"
    )


if __name__ == "__main__":
    main()
