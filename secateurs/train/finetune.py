"""Fine-tune a pruned model without losing its sparsity: full fine-tuning under fixed masks, or LoRA merged masked.

    model, tokenizer, report = finetune("out/wanda-50", data="shakespeare", steps=200, seqlen=256)

The folder is one ``secateurs prune`` wrote (a Hugging Face folder or the compact sparse one). Its masks come
from ``masks.safetensors``, or, when it has none, from the zeros of its decoder linears. Training windows are drawn
from the calibration-text source exactly as calibration windows are (seeded start offsets), the evaluation text is
another source, and perplexity is measured before and after with :func:`secateurs.api.evaluate`, the protocol of
``prune``.

* Full fine-tuning: AdamW on every parameter; :class:`~secateurs.train.sparse.SparseTraining` with the given masks
  (the masked linears only) zeroes the gradients of pruned weights and re-applies the masks after every step.
* LoRA (``lora=rank``, needs ``peft``): adapters on the masked linears, base frozen; afterwards each adapter's
  delta is multiplied by the mask and added to the weight, so pruned positions stay exactly zero.

Either way the report checks, from the weights, that every pruned position is zero and that every row's zero count
(and every N:M group's, when the pruning report names a pattern) is unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from torch import nn

from secateurs.data import calibration_windows, describe_source
from secateurs.errors import SecateursError
from secateurs.measure import PeakMemory
from secateurs.models import check_seqlen, decoder_linears, default_device, load_model, weight_view
from secateurs.oneshot.select import NM, parse_nm

log = logging.getLogger("secateurs")

__all__ = ["DEFAULT_LR", "DEFAULT_LORA_LR", "finetune", "load_pruned_folder", "sparsity_check", "training_windows"]

DEFAULT_LR = 2e-5  # full fine-tuning
DEFAULT_LORA_LR = 2e-4  # LoRA adapters (trained from zero, so a larger step)
REPORT_NAME = "report.json"
MASKS_NAME = "masks.safetensors"


# --------------------------------------------------------------------------------------------------- loading
def load_pruned_folder(pruned_dir: str | Path, dtype: str | torch.dtype | None = "auto"):
    """(model, tokenizer, masks, prune report or {}, description) of a folder ``secateurs prune`` wrote.

    ``masks``: {linear: bool [out, in], True = pruned} from ``masks.safetensors``, else the zeros of the decoder
    linears. Raises SecateursError for a missing folder or one that secateurs did not write.
    """
    from secateurs.loading import load_masks

    folder = Path(pruned_dir).expanduser()
    if not folder.exists():
        raise SecateursError(f"pruned model folder {folder} does not exist")
    if not folder.is_dir():
        raise SecateursError(f"{folder} is not a folder (give the output folder of secateurs prune)")
    if not (folder / "config.json").is_file():
        raise SecateursError(f"{folder} is not a model folder (no config.json)")
    has_masks = (folder / MASKS_NAME).is_file()
    report: dict = {}
    if (folder / REPORT_NAME).is_file():
        try:
            report = json.loads((folder / REPORT_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise SecateursError(f"cannot read {folder / REPORT_NAME}: {exc}") from None
        if not isinstance(report, dict):
            raise SecateursError(f"{folder / REPORT_NAME} is not a secateurs report")
    if not has_masks and "recipe" not in report:
        raise SecateursError(
            f"{folder} is not a secateurs prune output (no {MASKS_NAME}, no {REPORT_NAME} with a recipe)"
        )
    model, tokenizer, desc = load_model(str(folder), dtype)
    if tokenizer is None:
        raise SecateursError(f"{folder} has no tokenizer")
    linears = decoder_linears(model)
    if has_masks:
        masks = load_masks(folder)
        for name, mask in masks.items():
            module = linears.get(name)
            if module is None:
                raise SecateursError(f"{folder / MASKS_NAME} names {name}, not a decoder linear of the model")
            if tuple(mask.shape) != tuple(weight_view(module).shape):
                raise SecateursError(f"{folder / MASKS_NAME}: the mask of {name} does not fit its weight")
    else:
        log.info("%s has no %s: masks from the zeros of the decoder linears", folder, MASKS_NAME)
        masks = {name: (weight_view(m) == 0).cpu() for name, m in linears.items()}
        masks = {name: mask for name, mask in masks.items() if mask.any()}
    if not masks:
        raise SecateursError(f"{folder} has no pruned linear: nothing to keep sparse")
    return model, tokenizer, masks, report, desc


def report_pattern(report: dict) -> NM | None:
    """The N:M pattern a pruning report names (its recipe's ``pattern``), or None."""
    recipe = report.get("recipe") if isinstance(report, dict) else None
    pattern = recipe.get("pattern") if isinstance(recipe, dict) else None
    return parse_nm(pattern) if pattern else None


# ----------------------------------------------------------------------------------------------------- data
def training_windows(source: str, tokenizer, count: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``count`` token windows [count, seqlen] of ``source``, drawn as calibration windows are.

    The same protocol as :func:`secateurs.data.calibration_windows` (the whole text tokenised once without special
    tokens, start offsets from ``random.Random(seed)``; C4 by its document protocol), so the first windows equal the
    calibration windows of the same seed; but windows may cover the text more than once (training takes many).
    """
    from secateurs.data.sources import read_text, resolve_source
    from secateurs.data.windows import _tokens

    for label, value in (("steps x batch size", count), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SecateursError(f"{label} must be a positive integer, got {value!r}")
    kind, name = resolve_source(source)
    if kind == "hub" and name == "c4":
        return calibration_windows(source, tokenizer, count, seqlen, seed)
    ids = _tokens(str(source), tokenizer, read_text(source, "train"))
    total = ids.numel()
    if total <= seqlen:
        raise SecateursError(f"training text too short: {source!r} gives {total} tokens, need more than {seqlen}")
    rng = random.Random(seed)
    starts = torch.tensor([rng.randint(0, total - seqlen) for _ in range(count)], dtype=torch.long)
    return ids[starts[:, None] + torch.arange(seqlen)]


# ------------------------------------------------------------------------------------------------- sparsity
@torch.no_grad()
def _zeros(linears: dict[str, nn.Module], nm: NM | None) -> dict[str, dict[str, torch.Tensor]]:
    """Per linear: zeros per row [out] and, with a pattern, zeros per N:M group [out, in / m] (from the weights)."""
    out = {}
    for name, module in linears.items():
        zero = weight_view(module) == 0
        entry = {"rows": zero.sum(dim=1).cpu(), "numel": zero.numel()}
        if nm is not None and zero.shape[1] % nm.m == 0:
            entry["groups"] = zero.reshape(zero.shape[0], -1, nm.m).sum(dim=2).cpu()
        out[name] = entry
    return out


@torch.no_grad()
def sparsity_check(
    linears: dict[str, nn.Module],
    masks: dict[str, torch.Tensor],
    before: dict[str, dict[str, torch.Tensor]],
    nm: NM | None = None,
) -> dict:
    """Compare the weights now with the zero counts ``before`` (from :func:`_zeros`): a report section.

    ``rows_unchanged``: every row of every linear has the zero count it had; ``pruned_zero``: every masked
    position is exactly zero; ``groups_unchanged`` / ``groups_ok`` (with a pattern): every N:M group has the zero
    count it had, and at least N zeros.
    """
    after = _zeros(linears, nm)
    per_linear, changed_rows, nonzero_pruned = {}, 0, 0
    groups_changed, groups_short = 0, 0
    for name in linears:
        b, a = before[name], after[name]
        rows = int((b["rows"] != a["rows"]).sum())
        changed_rows += rows
        W = weight_view(linears[name])
        nonzero_pruned += int((W[masks[name].to(W.device)] != 0).sum()) if name in masks else 0
        per_linear[name] = {
            "before": float(b["rows"].sum()) / b["numel"],
            "after": float(a["rows"].sum()) / a["numel"],
        }
        if "groups" in a:
            groups_changed += int((b["groups"] != a["groups"]).sum())
            groups_short += int((a["groups"] < nm.n).sum())
    zeros_before = sum(int(v["rows"].sum()) for v in before.values())
    zeros_after = sum(int(v["rows"].sum()) for v in after.values())
    numel = sum(v["numel"] for v in after.values())
    out = {
        "linears": per_linear,
        "overall_before": zeros_before / max(numel, 1),
        "overall_after": zeros_after / max(numel, 1),
        "pruned_zero": nonzero_pruned == 0,
        "pruned_nonzero": nonzero_pruned,
        "rows_unchanged": changed_rows == 0,
        "rows_changed": changed_rows,
        "pattern": str(nm) if nm else None,
    }
    if nm is not None:
        out["groups_unchanged"] = groups_changed == 0
        out["groups_changed"] = groups_changed
        out["groups_ok"] = groups_short == 0
    return out


# ----------------------------------------------------------------------------------------------------- LoRA
def _import_peft():
    try:
        import peft
    except ImportError:
        raise SecateursError(
            "LoRA fine-tuning needs the peft package: pip install 'secateurs[finetune]' (or pip install peft)"
        ) from None
    return peft


def _add_lora(model: nn.Module, names: list[str], rank: int, alpha: float):
    peft = _import_peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=names, bias="none")
    return peft.get_peft_model(model, config)


@torch.no_grad()
def _merge_lora_masked(peft_model, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Add each adapter's delta times the keep mask to its base weight, then drop the adapters (no plain merge)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    merged = 0
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        layer = module.get_base_layer()
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            delta = module.get_delta_weight(adapter)  # the weight's own layout
            keep = ~masks[name].to(delta.device)
            keep = keep if isinstance(layer, nn.Linear) else keep.t()
            layer.weight.data += (delta * keep).to(layer.weight.dtype)
            merged += 1
    if not merged:
        raise SecateursError("no LoRA adapter to merge")
    model = peft_model.unload()  # adapters removed, base weights as they are (already merged above)
    return model


# ------------------------------------------------------------------------------------------------ the verb
def _evaluate(model, tokenizer, source, seqlen, windows, device, progress, label):
    from secateurs.api import evaluate

    model.eval()
    result = evaluate(model, tokenizer, source, seqlen=seqlen, max_windows=windows, device=device, progress=progress)
    log.info("%s perplexity %.3f  [%s]", label, result.perplexity, result.protocol)
    return result


def _eval_protocol(report: dict, seqlen: int | None, windows) -> tuple[int, int | None | str]:
    """Evaluation seqlen and window count: given ones, else those of the pruning report, else prune's defaults."""
    pruned = (report.get("perplexity") or {}).get("pruned") or (report.get("perplexity") or {}).get("after") or {}
    if seqlen is None:
        seqlen = int(pruned.get("seqlen") or 512)
    if windows is None:
        windows = int(pruned["windows"]) if pruned.get("windows") else "auto"
    return seqlen, windows


def _adamw(params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the kernel (several times faster than the default on CPU), else the default."""
    if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _lr_at(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then linear decay to 10% at the last step (a factor on the lr)."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(steps - warmup, 1)
    return 1.0 - 0.9 * (step - warmup) / span


def finetune(
    pruned_dir: str | Path,
    *,
    data: str = "shakespeare",
    steps: int = 200,
    seqlen: int = 256,
    batch_size: int = 1,
    lr: float | None = None,
    seed: int = 0,
    lora: int | None = None,
    lora_alpha: float | None = None,
    eval_source: str | None = "bible",
    eval_windows: int | str | None = None,
    eval_seqlen: int | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    device: str | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    output: str | Path | None = None,
    overwrite: bool = False,
    save_format: str = "hf",
    progress: bool = True,
):
    """Fine-tune the pruned model in ``pruned_dir`` keeping its masks; returns (model, tokenizer, report dict).

    ``data``: the training text (a calibration source: bundled name, file, c4, wikitext2), ``steps`` AdamW steps of
    ``batch_size`` seeded windows of ``seqlen`` tokens. ``lr``: None for 2e-5 (full) or 2e-4 (LoRA), with linear
    warmup (5% of the steps) and linear decay to 10%. ``lora``: the LoRA rank (None: full fine-tuning);
    ``lora_alpha`` defaults to the rank. ``eval_source`` (None or "none": no perplexity), ``eval_seqlen`` and
    ``eval_windows`` (None: those of the pruning report, else 512 tokens and prune's default count; "all": every
    window) give the perplexity protocol, measured before and after. ``output``: save the fine-tuned model there
    (atomically, with ``masks.safetensors`` and the report; ``save_format`` hf or sparse).
    """
    from tqdm.auto import tqdm

    from secateurs.checkpoint import check_output, save_pruned
    from secateurs.train.sparse import SparseTraining

    source = data
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SecateursError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SecateursError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise SecateursError(f"seqlen must be an integer of at least 2, got {seqlen!r}")
    if lora is not None and (isinstance(lora, bool) or not isinstance(lora, int) or lora < 1):
        raise SecateursError(f"LoRA rank must be a positive integer, got {lora!r}")
    if lr is None:
        lr = DEFAULT_LORA_LR if lora else DEFAULT_LR
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise SecateursError(f"learning rate must be a positive number, got {lr!r}")
    if save_format not in ("hf", "sparse"):
        raise SecateursError(f"unknown save format {save_format!r}: use hf or sparse")
    if lora:
        _import_peft()  # before loading anything
    do_eval = bool(eval_source) and str(eval_source).lower() != "none"
    train_desc = describe_source(source)
    if do_eval:
        eval_desc = describe_source(eval_source)
        if eval_desc == train_desc:
            log.warning("training and evaluation text are the same (%s): the perplexity is not held out", eval_desc)
    output = check_output(output, overwrite) if output is not None else None
    dev = default_device(device)

    t_start = time.perf_counter()
    model, tokenizer, masks, prune_report, desc = load_pruned_folder(pruned_dir, dtype)
    nm = report_pattern(prune_report)
    check_seqlen(model, seqlen)
    eval_len, eval_count = _eval_protocol(prune_report, eval_seqlen, eval_windows)
    if eval_count == "all":
        eval_count = None
    if do_eval:
        check_seqlen(model, eval_len)
    windows = training_windows(source, tokenizer, steps * batch_size, seqlen, seed)
    linears = decoder_linears(model)
    masked = {name: linears[name] for name in masks}
    model.to(dev)
    before_zeros = _zeros(masked, nm)
    before = (
        _evaluate(model, tokenizer, eval_source, eval_len, eval_count, None, progress, "before") if do_eval else None
    )

    torch.manual_seed(seed)
    sparse = None
    if lora:
        alpha = float(lora_alpha) if lora_alpha is not None else float(lora)
        model = _add_lora(model, list(masked), lora, alpha)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        alpha = None
        params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = _adamw(params, lr, weight_decay)
    if not lora:
        # masks are [out, in]; a GPT-2 Conv1D holds its weight as [in, out]
        held = {n: m if isinstance(masked[n], nn.Linear) else m.t() for n, m in masks.items()}
        sparse = SparseTraining(model, optimizer, masks=held, targets=list(masked), sparsity=0.0)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_at(s, steps, warmup))

    losses: list[float] = []
    model.train()
    t_train = time.perf_counter()
    with PeakMemory() as mem:
        bar = tqdm(range(steps), desc="fine-tuning", unit="step", disable=not progress)
        for step in bar:
            batch = windows[step * batch_size : (step + 1) * batch_size].to(dev)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise SecateursError(f"the loss is {loss.item()} at step {step + 1}: lower the learning rate")
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            if sparse is not None:
                sparse.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        if sparse is not None:
            model = sparse.finalize()
        else:
            model = _merge_lora_masked(model, masks)
    train_seconds = time.perf_counter() - t_train
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    linears = decoder_linears(model)
    masked = {name: linears[name] for name in masks}
    check = sparsity_check(masked, masks, before_zeros, nm)
    if not check["pruned_zero"] or not check["rows_unchanged"]:
        log.warning(
            "sparsity changed: %d pruned weights non-zero, %d rows with another zero count",
            check["pruned_nonzero"],
            check["rows_changed"],
        )
    after = (
        _evaluate(model, tokenizer, eval_source, eval_len, eval_count, None, progress, "after ") if do_eval else None
    )
    window = min(10, len(losses))
    report = {
        "source": str(Path(pruned_dir).expanduser()),
        "model": prune_report.get("model", desc),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "recipe": prune_report.get("recipe"),
        "finetune": {
            "mode": "lora" if lora else "full",
            "data": train_desc,
            "steps": steps,
            "seqlen": seqlen,
            "batch_size": batch_size,
            "tokens": steps * batch_size * seqlen,
            "seed": seed,
            "windows": f"{steps * batch_size} windows of {seqlen} tokens of {train_desc} at seeded offsets "
            f"(random.Random({seed}), as calibration), one batch of {batch_size} per step, no BOS",
            "optimizer": {
                "name": "AdamW",
                "fused": bool(optimizer.defaults.get("fused")),
                "lr": lr,
                "weight_decay": weight_decay,
                "max_grad_norm": max_grad_norm,
            },
            "schedule": f"linear warmup {warmup} steps, then linear decay to 10%",
            "lr": lr,
            "lora": {"rank": lora, "alpha": alpha, "targets": len(masked)} if lora else None,
            "trainable_parameters": trainable,
            "device": str(dev),
            "train_seconds": train_seconds,
            "peak_rss_bytes": mem.peak_rss,
            "peak_cuda_bytes": mem.peak_cuda,
            "loss": {
                "first": losses[0],
                "last": losses[-1],
                "mean_first": sum(losses[:window]) / window,
                "mean_last": sum(losses[-window:]) / window,
            },
            "losses": losses,
        },
        "sparsity": check,
        "perplexity": {
            "dense": (prune_report.get("perplexity") or {}).get("dense"),
            "before": before.to_dict() if before else None,
            "after": after.to_dict() if after else None,
        },
        "pruning": prune_report or None,
        "wall_seconds": time.perf_counter() - t_start,
        "output": str(output) if output else None,
    }
    if output is not None:
        model.to(torch.device("cpu"))
        save_pruned(model, tokenizer, output, report, overwrite=overwrite, save_format=save_format, masks=masks)
        log.info("saved to %s", output)
    if before and after:
        log.info(
            "perplexity %.3f -> %.3f after %d steps (%s)",
            before.perplexity,
            after.perplexity,
            steps,
            report["finetune"]["mode"],
        )
    return model, tokenizer, report
