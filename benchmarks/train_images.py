"""Sparse training on real images (scikit-learn's bundled 8x8 digits, or --data mnist: 5000 real MNIST images),
averaged over seeds.

Prints, for each study, mean +- std over seeds of test accuracy, with the protocol:
  1. 90% sparsity, MLP 64-300-100-10: dense, static-random, static-ERK, SET, RigL, GMP (--sparsity to change);
  2. SR-STE 2:4 and 4:8 on the MLP (first layer's 64 inputs and all hidden widths divisible by 8), the exact
     pattern checked from the weights;
  3. DSFF kernel sparsity (kernel-rigl) at 80% of the kernels of a 3-conv CNN, zero kernels counted from the weights;
  4. REST vs RigL without reweighting vs dense on coloured digits (colour = label for 95% of training samples),
     accuracy on bias-aligned and bias-conflicting test samples and worst (label, colour) group.

    python benchmarks/train_images.py                       # all studies, 3 seeds
    python benchmarks/train_images.py --studies 1 --sparsity 0.98 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from secateurs.train import GMP, REST, SET, SRSTE, KernelRigL, RigL, SparseTraining, Static
from secateurs.train.data import coloured, digits, group_accuracy, mnist
from secateurs.train.models import build_model


def run(data, model_name, method, *, seed, epochs, lr=0.1, batch=64, sampler=None, model_kw=None, **sparse_kw):
    torch.manual_seed(seed)
    model = build_model(model_name, data, **(model_kw or {}))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    train_loader, test_loader = data.loaders(batch, seed)
    if sampler is not None:
        train_loader = torch.utils.data.DataLoader(train_loader.dataset, batch_size=batch, sampler=sampler)
    steps = epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    sparse = None if method is None else SparseTraining(model, opt, method, total_steps=steps, seed=seed, **sparse_kw)
    model.train()
    for _ in range(epochs):
        for x, y, _ in train_loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            if sparse is not None:
                sparse.step()
    if sparse is not None:
        sparse.finalize()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x, _, _ in test_loader])
    return model, pred


def accuracy(pred, data):
    return 100 * (pred == data.test_y).float().mean().item()


def stats(values):
    return f"{statistics.mean(values):6.2f} +- {statistics.pstdev(values):4.2f}"


def zeros(model, names):
    z = sum(int((model.get_submodule(n).weight == 0).sum()) for n in names)
    return z / sum(model.get_submodule(n).weight.numel() for n in names)


def study_1(args):
    print(
        f"\n1. {args.sparsity:.0%} sparsity, MLP {args.inputs}-300-100-10, all Linear layers sparse, "
        f"{args.epochs} epochs"
    )
    rows = {
        "dense": (None, {}),
        "static-random (uniform)": (Static(), {"distribution": "uniform"}),
        "static-random (ERK)": (Static(), {"distribution": "erk"}),
        "SET (ERK)": (SET(), {"distribution": "erk"}),
        "RigL (ERK)": (RigL(), {"distribution": "erk"}),
        "GMP (uniform)": (GMP(), {"distribution": "uniform"}),
    }
    for label, (method, kw) in rows.items():
        accs, sp = [], []
        for seed in args.seeds:
            data = args.load(seed)
            model, pred = run(data, "mlp", method, seed=seed, epochs=args.epochs, sparsity=args.sparsity, **kw)
            accs.append(accuracy(pred, data))
            sp.append(zeros(model, ["layers.0", "layers.2", "classifier"]) if method else 0.0)
        print(f"  {label:26s} accuracy {stats(accs)}   zeros {statistics.mean(sp):.3f}")


def study_2(args):
    print(f"\n2. SR-STE N:M from scratch, MLP {args.inputs}-304-104-10 (widths divisible by 8), {args.epochs} epochs")
    kw = {"hidden": (304, 104)}
    for label, method, pattern in (
        ("dense", None, None),
        ("SR-STE 2:4", SRSTE(), "2:4"),
        ("SR-STE 4:8", SRSTE(), "4:8"),
    ):
        accs, exact = [], True
        for seed in args.seeds:
            data = args.load(seed)
            sk = {"pattern": pattern, "exclude": ["classifier"]} if method else {}
            model, pred = run(data, "mlp", method, seed=seed, epochs=args.epochs, model_kw=kw, **sk)
            accs.append(accuracy(pred, data))
            if method:
                m = int(pattern.split(":")[1])
                n = int(pattern.split(":")[0])
                for name in ("layers.0", "layers.2"):
                    W = model.get_submodule(name).weight
                    exact &= bool(((W == 0).view(W.shape[0], -1, m).sum(-1) >= n).all())
        tail = f"   exact {pattern} in every group of the sparse layers: {exact}" if method else ""
        print(f"  {label:26s} accuracy {stats(accs)}{tail}")


def study_3(args):
    print(f"\n3. DSFF kernel-level dynamic sparsity, CNN (3 conv 3x3, width 32), 80% of kernels, {args.epochs} epochs")
    convs = ["features.conv1", "features.conv2", "features.conv3"]
    for label, method in (
        ("dense", None),
        ("kernel-rigl random regrowth", KernelRigL()),
        ("kernel-rigl gradient regrowth", KernelRigL(growth="gradient")),
    ):
        accs, zk = [], []
        for seed in args.seeds:
            data = args.load(seed)
            kw = {"sparsity": 0.8, "targets": ["features.conv2", "features.conv3"], "distribution": "uniform"}
            model, pred = run(data, "cnn", method, seed=seed, epochs=args.epochs, lr=0.05, **(kw if method else {}))
            accs.append(accuracy(pred, data))
            k = [(model.get_submodule(c).weight.flatten(2) == 0).all(2) for c in convs[1:]]
            zk.append(sum(int(t.sum()) for t in k) / sum(t.numel() for t in k))
        print(f"  {label:30s} accuracy {stats(accs)}   zero kernels in conv2+conv3 {statistics.mean(zk):.3f}")


def study_4(args):
    print(
        f"\n4. REST on coloured {args.data} (bias {args.bias:.0%}), CNN width 32, {args.sparsity_rest:.0%} sparse "
        f"(ERK), {args.epochs} epochs; test colours uniformly random"
    )
    rows = (("dense", None), ("RigL, no reweighting", RigL(alpha=0.5, end=1.0)), ("REST", REST()))
    for label, method in rows:
        res = {"accuracy": [], "aligned": [], "conflicting": [], "worst_group": []}
        for seed in args.seeds:
            data = coloured(args.load(seed), args.bias, seed)
            sampler = None
            if isinstance(method, REST):
                conflicting = ~data.group["train_aligned"]
                sampler = method.sampler(conflicting, torch.Generator().manual_seed(seed))
            kw = {"sparsity": args.sparsity_rest} if method else {}
            _, pred = run(data, "cnn", method, seed=seed, epochs=args.epochs, lr=0.05, sampler=sampler, **kw)
            g = group_accuracy(pred, data.test_y, data.group["test_aligned"], data.group["test_colour"])
            for k in res:
                res[k].append(100 * g[k])
        print(f"  {label:22s} " + "  ".join(f"{k} {stats(v)}" for k, v in res.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", default="1,2,3,4")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--sparsity-rest", type=float, default=0.9)
    p.add_argument("--bias", type=float, default=0.95)
    p.add_argument("--data", choices=["digits", "mnist"], default="digits", help="mnist: pip install -e '.[images]'")
    args = p.parse_args()
    args.load = {"digits": digits, "mnist": mnist}[args.data]
    sample = args.load(0)
    args.inputs = sample.in_features
    args.seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(2)
    start = time.time()
    print(
        f"protocol: {sample.name} ({len(sample.train_y) + len(sample.test_y)} images {tuple(sample.input_shape)}), "
        f"stratified 75/25 split by seed; seeds {args.seeds}; SGD "
        f"momentum 0.9, weight decay 5e-4, batch 64, cosine LR; torch {torch.__version__}"
    )
    for s in args.studies.split(","):
        globals()[f"study_{s.strip()}"](args)
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
