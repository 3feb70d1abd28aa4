"""Fingerprint the masks every recipe produces, to show a refactor changed no result.

Prunes tiny random models of several families and (with ``--smollm2``) the bundled SmolLM2-135M on fixed
calibration windows, for a grid of recipes, and prints one SHA-256 per recipe over every pruned linear's
zero pattern (``weight == 0``, in module order) and its weights' bytes. ``--write FILE`` saves them as JSON;
``--check FILE`` compares with a saved file and exits 1 when any recipe differs.

    python benchmarks/mask_hashes.py --smollm2 --write benchmarks/mask_hashes.json
    python benchmarks/mask_hashes.py --smollm2 --check benchmarks/mask_hashes.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

import secateurs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

# (method, target, allocation, refine): target is a sparsity or an N:M pattern
RECIPES = [
    ("magnitude", 0.5, "uniform", None),
    ("magnitude", "2:4", "uniform", None),
    ("wanda", 0.5, "uniform", None),
    ("wanda", 0.7, "owl", None),
    ("wanda", "2:4", "uniform", None),
    ("wanda", "4:8", "owl", None),
    ("wanda", 0.6, "uniform", "dsnot"),
    ("wanda", "2:4", "uniform", "dsnot"),
    ("sparsegpt", 0.5, "uniform", None),
    ("sparsegpt", "2:4", "uniform", None),
    ("sparsegpt", 0.7, "owl", "dsnot"),
    ("magnitude", 0.6, "owl", "dsnot"),
]


def recipe_of(method, target, allocation, refine) -> secateurs.Recipe:
    kind = {"pattern": target} if isinstance(target, str) else {"sparsity": target}
    return secateurs.Recipe(method=method, allocation=allocation, refine=refine, **kind)


def key_of(method, target, allocation, refine) -> str:
    return "-".join(str(p) for p in (method, target, allocation, refine or "none"))


def fingerprint(model) -> str:
    digest = hashlib.sha256()
    name, layers = secateurs.find_layers(model)
    for layer in layers:
        for module in secateurs.find_linears(layer).values():
            W = module.weight.detach()
            digest.update((W == 0).numpy().tobytes())
            digest.update(W.float().numpy().tobytes())
    return digest.hexdigest()[:20]


def tiny_hashes() -> dict[str, str]:
    from conftest import VOCAB, tiny_model

    out = {}
    for family in ("llama", "gpt2", "opt"):
        torch.manual_seed(1)
        windows = torch.randint(0, VOCAB, (4, 32))
        for spec in RECIPES:
            model = tiny_model(family)
            secateurs.prune(model, recipe_of(*spec), windows, device="cpu", progress=False)
            out[f"tiny-{family}-{key_of(*spec)}"] = fingerprint(model)
    return out


def smollm2_hashes() -> dict[str, str]:
    model, tokenizer, _ = secateurs.load_model("smollm2-135m")
    windows = secateurs.Calibration("shakespeare", nsamples=4, seqlen=128, seed=0).windows(tokenizer)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = {}
    for spec in RECIPES:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        secateurs.prune(model, recipe_of(*spec), windows, device="cpu", progress=False)
        out[f"smollm2-{key_of(*spec)}"] = fingerprint(model)
        print(f"{key_of(*spec)}: {out[f'smollm2-{key_of(*spec)}']}", file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (4 x 128 calibration tokens)")
    parser.add_argument("--write", metavar="FILE")
    parser.add_argument("--check", metavar="FILE")
    args = parser.parse_args()
    torch.set_num_threads(2)
    hashes = tiny_hashes()
    if args.smollm2:
        hashes.update(smollm2_hashes())
    print("protocol: tiny llama/gpt2/opt (seed 0) on 4 x 32 random tokens (seed 1); SmolLM2 on 4 x 128 Shakespeare")
    for key, value in hashes.items():
        print(f"{key:55s} {value}")
    if args.write:
        Path(args.write).write_text(json.dumps(hashes, indent=1) + "\n")
    if args.check:
        saved = json.loads(Path(args.check).read_text())
        differ = [k for k in saved if k in hashes and saved[k] != hashes[k]]
        missing = [k for k in saved if k not in hashes]
        print(
            f"{len(saved) - len(differ) - len(missing)} of {len(saved)} recipes identical; differ: {differ or 'none'}"
        )
        return 1 if differ or missing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
