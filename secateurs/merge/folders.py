"""Deltas and merges of Hugging Face model folders: load, check that the models match, run, write the output folder.

What ``secateurs delta`` and ``secateurs merge`` run. Every model must be of the base's class with exactly its
tensors (names and shapes), otherwise one error names the first tensor that differs, before any work; the output
is written atomically (a hidden temporary folder renamed when complete) with a ``report.json`` holding the
recipe, the protocol in words, what was measured, and the versions.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from secateurs.data.calibration import Calibration
from secateurs.errors import SecateursError
from secateurs.format.folder import check_output
from secateurs.measure import versions
from secateurs.merge.adamerging import AdaMerging, adamerge
from secateurs.merge.delta import (
    DARE,
    SparseDelta,
    choose_q,
    drop,
    fingerprint,
    is_delta_folder,
    load_delta,
    make_delta,
    output_change,
    q_grid,
    save_delta,
)
from secateurs.merge.methods import TIES, Method, TaskArithmetic, merge
from secateurs.merge.tensors import Tensors, add, check_match, first_mismatch, float_tensors, load_into, task_vector

log = logging.getLogger("secateurs")


def _load(spec: str, dtype: str):
    from secateurs.models import load_model

    return load_model(str(spec), dtype)


def check_same_model(base_model: torch.nn.Module, model: torch.nn.Module, label: str) -> Tensors:
    """The model's float tensors, after checking it is of the base's class with the base's tensors and shapes."""
    tensors = float_tensors(model)
    if type(model).__name__ != type(base_model).__name__:
        problem = first_mismatch(float_tensors(base_model), tensors)
        first = f" ({problem})" if problem else ""
        raise SecateursError(
            f"{label} is a {type(model).__name__}, the base a {type(base_model).__name__}{first}: "
            "only models of the base's architecture can be compared or merged"
        )
    check_match(float_tensors(base_model), tensors, label)
    return tensors


def _batches(windows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [windows[i : i + size] for i in range(0, len(windows), size)]


def _darex_q(model, base: Tensors, finetuned: Tensors, config: DARE, windows: torch.Tensor, task: int = 0):
    """DAREx-q's divisor for one task, chosen by the mean absolute logit change on ``windows``: (q, table)."""
    dropped = drop(task_vector(base, finetuned), config.drop, config.seed, task)
    change = output_change(model, base, finetuned, dropped, _batches(windows, 4))
    q, table = choose_q(change, q_grid(config.drop))
    log.info("DAREx-q: q = %.4g (factor %.3g; DARE's 1/(1-p) = %.3g)", q, 1 / q, 1 / (1 - config.drop))
    return q, table


def _protocol_dare(config: DARE, q_source: str | None) -> str:
    text = (
        f"delta = fine-tuned - base for every floating-point tensor (float32); each entry kept with probability "
        f"1 - p = {1 - config.drop:g} (Bernoulli mask per entry, each tensor's seeded by seed {config.seed} and its "
        f"name), zeroed otherwise; "
    )
    if config.rescale == "dare":
        return text + f"kept entries x 1/(1 - p) = {1 / (1 - config.drop):.6g} (DARE)"
    if q_source is None:
        return text + "kept entries x 1/q with the q given (DAREx-q)"
    return text + (
        f"kept entries x 1/q (DAREx-q), q chosen on {len(q_grid(config.drop))} points geometric from 1 - p to 1 "
        f"by the smallest mean |logits(fine-tuned) - logits(base + dropped/q)| on {q_source}"
    )


# ------------------------------------------------------------------------------------------------------ delta
def delta_folder(
    base: str,
    finetuned: str,
    output: str | Path,
    config: DARE | None = None,
    *,
    calibration: Calibration | None = None,
    overwrite: bool = False,
    dtype: str = "auto",
) -> dict:
    """Write the DARE'd delta finetuned - base as a compact delta folder; returns its report.

    With ``rescale="darex"`` and no q, q is chosen on ``calibration``'s token windows (default: 4 windows of 128
    tokens of the bundled Shakespeare, seed 0).
    """
    config = config or DARE()
    check_output(output, overwrite)
    t0 = time.perf_counter()
    base_model, tokenizer, base_desc = _load(base, dtype)
    base_tensors = float_tensors(base_model)
    ft_model, _, ft_desc = _load(finetuned, dtype)
    ft_tensors = check_same_model(base_model, ft_model, str(finetuned))
    del ft_model
    q, table, q_source = None, None, None
    if config.rescale == "darex" and config.q is None:
        calibration = calibration or Calibration("shakespeare", nsamples=4, seqlen=128, seed=0)
        c = calibration
        q_source = f"{c.nsamples} windows of {c.seqlen} tokens of {c.source} (seed {c.seed})"
        windows = calibration.windows(tokenizer)
        q, table = _darex_q(base_model, base_tensors, ft_tensors, config, windows)
    delta = make_delta(base_tensors, task_vector(base_tensors, ft_tensors), config, q)
    delta.architecture = type(base_model).__name__
    if table is not None:
        delta.recipe["q_search"] = {"source": q_source, "table": table}
    report = {
        "kind": "delta",
        "base": base_desc,
        "finetuned": ft_desc,
        "architecture": delta.architecture,
        "dtype": str(next(iter(base_tensors.values())).dtype).replace("torch.", ""),
        "recipe": delta.recipe,
        "protocol": _protocol_dare(config, q_source),
        "seconds": None,
        "versions": versions(),
    }
    report["seconds"] = time.perf_counter() - t0
    sizes = save_delta(delta, output, report, overwrite)
    log.info(
        "delta: %d of %d entries kept (%.4f); %.2f MB against %.2f MB dense (%.4fx)",
        sizes["nnz"],
        sizes["numel"],
        sizes["kept_fraction"],
        sizes["delta_file_bytes"] / 1e6,
        sizes["dense_delta_bytes"] / 1e6,
        sizes["delta_ratio"],
    )
    return {**report, "bytes": sizes, "output": str(output)}


def _checked_delta(base_model, base_tensors: Tensors, folder: str | Path) -> SparseDelta:
    delta = load_delta(folder)
    if delta.architecture and delta.architecture != type(base_model).__name__:
        raise SecateursError(
            f"{folder} is a delta of a {delta.architecture}, the base is a {type(base_model).__name__}"
        )
    check_match(base_tensors, delta.tensors, f"the delta in {folder}")
    if fingerprint(base_tensors) != delta.base_sha256:
        raise SecateursError(f"{folder} was made from another base model (its fingerprint differs)")
    return delta


def apply_folder(base: str, delta: str | Path, output: str | Path, *, overwrite: bool = False, dtype: str = "auto"):
    """Write base + the saved delta as a Hugging Face folder (the base's config and tokenizer); returns the report."""
    from secateurs.checkpoint import save_pruned

    check_output(output, overwrite)
    if not is_delta_folder(delta):
        raise SecateursError(f"{delta} is not a delta folder (no delta.json): make one with secateurs delta")
    base_model, tokenizer, base_desc = _load(base, dtype)
    base_tensors = float_tensors(base_model)
    sparse = _checked_delta(base_model, base_tensors, delta)
    load_into(base_model, sparse.apply(base_tensors, check=False))
    report = {
        "kind": "delta-apply",
        "base": base_desc,
        "delta": str(Path(delta).expanduser().resolve()),
        "recipe": sparse.recipe,
        "protocol": "every tensor = base + stored delta (float32 sum, back in the base's dtype)",
        "kept_fraction": sparse.nnz() / max(sparse.numel(), 1),
        "versions": versions(),
    }
    save_pruned(base_model, tokenizer, output, report, overwrite=overwrite)
    return {**report, "output": str(output)}


# ------------------------------------------------------------------------------------------------------ merge
def _protocol_merge(method: Method | AdaMerging, tasks: int) -> str:
    if isinstance(method, AdaMerging):
        per = "one per task" if method.granularity == "task" else "one per task and tensor"
        return (
            f"theta = theta_0 + sum_t lambda_t tau_t over {tasks} task vectors, lambdas ({per}) from {method.init:g}, "
            f"clamped to {list(method.clamp) if method.clamp else 'no range'}, Adam lr {method.lr:g} for "
            f"{method.steps} steps on the summed mean next-token entropy of {method.batch_size} windows per task "
            f"(seed {method.seed}) (AdaMerging)"
        )
    dare = getattr(method, "dare", None)
    lead = f"tau_t = model_t - theta_0 (float32) for {tasks} models; "
    if dare is not None:
        lead += f"each tau_t DARE'd: p = {dare.drop:g}, {dare.rescale} rescale, seed {dare.seed} (task t's own masks); "
    if isinstance(method, TaskArithmetic):
        return lead + f"theta = theta_0 + {method.lam:g} * sum_t tau_t (task arithmetic)"
    if isinstance(method, TIES):
        return lead + (
            f"TIES: keep the top {method.k:g} of each tau_t's magnitudes (per {method.scope}), sign per entry = "
            f"sign of the sum, mean over the tasks agreeing with it, theta = theta_0 + {method.lam:g} * merged"
        )
    return lead + "theta = theta_0 + mean_t tau_t (the average of the models)"


def merge_folder(
    base: str,
    models: Sequence[str],
    output: str | Path,
    method: Method | AdaMerging,
    *,
    texts: Sequence[str] | None = None,
    nsamples: int = 16,
    seqlen: int = 128,
    seed: int = 0,
    exclude: Sequence[str] = (),
    overwrite: bool = False,
    dtype: str = "auto",
    progress: bool = True,
) -> dict:
    """Merge fine-tuned models (folders, or delta folders of this base) into ``output``; returns the report.

    ``texts[t]``: unlabelled text of task t (AdaMerging's inputs, and DAREx-q's when no q is given), read as
    ``nsamples`` windows of ``seqlen`` tokens; ``exclude``: tensors (globs) left as the base has them.
    """
    from secateurs.checkpoint import save_pruned

    if len(models) < 1:
        raise SecateursError("merge needs at least one fine-tuned model (or delta)")
    dare = getattr(method, "dare", None)
    needs_text = isinstance(method, AdaMerging) or (dare is not None and dare.rescale == "darex" and dare.q is None)
    if needs_text and (not texts or len(texts) != len(models)):
        what = "AdaMerging" if isinstance(method, AdaMerging) else "DAREx-q without q"
        raise SecateursError(f"{what} needs one unlabelled text per model ({len(models)}), got {len(texts or [])}")
    if texts and len(texts) != len(models):
        raise SecateursError(f"one text per model: {len(models)} models, {len(texts)} texts")
    check_output(output, overwrite)
    if texts:
        from secateurs import data

        for source in texts:
            data.describe_source(source)
    t0 = time.perf_counter()
    base_model, tokenizer, base_desc = _load(base, dtype)
    base_tensors = float_tensors(base_model)
    vectors, descs = [], []
    for spec in models:
        if is_delta_folder(spec):
            vectors.append({k: v.float() for k, v in _checked_delta(base_model, base_tensors, spec).tensors.items()})
            descs.append(f"delta:{Path(spec).expanduser().resolve()}")
            continue
        model, _, desc = _load(spec, dtype)
        vectors.append(task_vector(base_tensors, check_same_model(base_model, model, str(spec))))
        descs.append(desc)
        del model
    excluded = [name for name in base_tensors if any(fnmatch.fnmatchcase(name, g) for g in exclude)]
    if exclude and len(excluded) == len(base_tensors):
        raise SecateursError("--exclude leaves no tensor to merge")
    kept = {k: v for k, v in base_tensors.items() if k not in excluded}
    vectors = [{k: v[k] for k in kept} for v in vectors]
    windows = None
    if needs_text:
        windows = [Calibration(source, nsamples, seqlen, seed).windows(tokenizer) for source in texts]
    extra: dict = {}
    if isinstance(method, AdaMerging):
        result = adamerge(base_model, kept, vectors, windows, method, progress=progress)
        merged = result.tensors
        extra["adamerging"] = result.to_dict()
    else:
        qs = None
        if needs_text:
            qs, tables = [], []
            for t, vector in enumerate(vectors):
                q, table = _darex_q(base_model, kept, add(kept, vector), dare, windows[t], task=t)
                qs.append(q)
                tables.append(table)
            extra["darex_q"] = {"q": qs, "tables": tables}
        merged = merge(kept, vectors, method, qs)
    load_into(base_model, merged)
    report = {
        "kind": "merge",
        "base": base_desc,
        "models": descs,
        "architecture": type(base_model).__name__,
        "recipe": method.to_dict(),
        "protocol": _protocol_merge(method, len(models)),
        "texts": {"sources": list(texts), "nsamples": nsamples, "seqlen": seqlen, "seed": seed} if texts else None,
        "excluded": excluded,
        **extra,
        "seconds": time.perf_counter() - t0,
        "versions": versions(),
    }
    save_pruned(base_model, tokenizer, output, report, overwrite=overwrite)
    log.info("merged %d models (%s) into %s", len(models), report["recipe"]["method"], output)
    return {**report, "output": str(output)}
