"""The image-classification sparse-training loop behind ``secateurs train``: one recipe in, a sparse model out.

    config = TrainConfig(data="digits", model="mlp", method="rigl", method_options={"interval": 20}, epochs=5)
    metrics = train(config, output="runs/rigl-90")

A :class:`TrainConfig` is the whole recipe (data, model, method and its settings, sparsity, optimizer, schedule,
seed), read from and written to YAML or JSON; the recipe that ran is saved as ``recipe.yaml`` in the output folder.
:func:`train` runs SGD or AdamW under :class:`~secateurs.train.sparse.SparseTraining` with a cosine learning rate,
evaluates on the test split every ``eval_every`` steps (on coloured data also the bias-aligned, bias-conflicting
and worst-group accuracy), and checkpoints every ``checkpoint_every`` steps into the output folder:

* ``checkpoint.safetensors``: the model's state (weights, BatchNorm statistics);
* ``checkpoint.pt``: the optimizer's and SparseTraining's state (tensors, a generator state and plain lists and
  dicts), read back with ``torch.load(weights_only=True)``, which never runs code from the file;
* ``checkpoint.json``: the step, the evaluations so far, the recipe that made it.

``resume=True`` continues from them and reproduces an uninterrupted run bit for bit on the CPU: the order of the
training samples is drawn per epoch from a generator seeded by (seed, epoch), and the learning rate is a function
of the step. At the end ``model.safetensors`` (masks baked in), ``metrics.json`` and ``plots.png`` are written
into a hidden temporary folder and moved into place, ``metrics.json`` last: a folder holding it is a finished run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.format.folder import follow_umask, replace_file
from secateurs.measure import PeakMemory, versions
from secateurs.oneshot.recipe import dumps, read_file
from secateurs.oneshot.select import check_sparsity, parse_nm
from secateurs.train.registry import method_from
from secateurs.train.sparse import DISTRIBUTIONS, SparseTraining

log = logging.getLogger("secateurs")

__all__ = ["CHECKPOINT_FILES", "DATA", "OPTIMIZERS", "TrainConfig", "load_data", "train"]

DATA = ("digits", "coloured-digits", "mnist", "coloured-mnist")
OPTIMIZERS = ("sgd", "adamw")
CHECKPOINT_FILES = ("checkpoint.safetensors", "checkpoint.pt", "checkpoint.json")
FINAL_FILES = (
    "recipe.yaml",
    "metrics.json",
    "model.safetensors",
    "model.sparse.safetensors",
    "module.json",
    "plots.png",
)
SAVE_FORMATS = ("safetensors", "sparse")
CHECKPOINT_VERSION = 1
EVAL_BATCH = 1024

# field -> (accepted Python types, words for the error): a recipe file is checked against these
_TYPES = {
    "data": ((str,), "a string"),
    "bias": ((float, int), "a number"),
    "model": ((str,), "a string"),
    "model_options": ((dict,), "a mapping of model arguments"),
    "method": ((str,), "a method name"),
    "method_options": ((dict,), "a mapping of method settings"),
    "sparsity": ((float, int), "a number"),
    "pattern": ((str, type(None)), "an N:M pattern such as '2:4', or null"),
    "distribution": ((str, dict), "erk, uniform, or a mapping of layer -> sparsity"),
    "targets": ((list, tuple), "a list of globs"),
    "exclude": ((list, tuple), "a list of globs"),
    "epochs": ((int,), "an integer"),
    "batch_size": ((int,), "an integer"),
    "lr": ((float, int), "a number"),
    "momentum": ((float, int), "a number"),
    "weight_decay": ((float, int), "a number"),
    "optimizer": ((str,), "sgd or adamw"),
    "seed": ((int,), "an integer"),
    "eval_every": ((int,), "an integer"),
    "checkpoint_every": ((int,), "an integer"),
}


@dataclass
class TrainConfig:
    """A sparse-training recipe for image classification.

    ``data``: digits, coloured-digits (``bias``: the fraction of training images whose stroke colour is their
    label's), mnist or coloured-mnist. ``model``: mlp or cnn, built with ``model_options`` (``hidden``, ``width``).
    ``method``: a name of :data:`secateurs.train.registry.METHODS` with its ``method_options`` (completed with the
    method's defaults, so the saved recipe says everything that ran). ``sparsity`` over the ``targets`` (globs of
    module names, minus ``exclude``) spread by ``distribution``; ``pattern="2:4"`` asks for N:M instead.
    ``eval_every`` / ``checkpoint_every``: in optimizer steps, 0 = once per epoch. ``seed`` fixes the data split,
    the colours, the initial weights and masks and the order of the training samples.
    """

    data: str = "digits"
    bias: float = 0.95
    model: str = "mlp"
    model_options: dict = field(default_factory=dict)
    method: str = "static"
    method_options: dict = field(default_factory=dict)
    sparsity: float = 0.9
    pattern: str | None = None
    distribution: str | dict = "erk"
    targets: list = field(default_factory=lambda: ["*"])
    exclude: list = field(default_factory=list)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        for name, (types, words) in _TYPES.items():
            value = getattr(self, name)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise SecateursError(f"recipe field {name} must be {words}, got {value!r}")
        for name in ("bias", "sparsity", "lr", "momentum", "weight_decay"):
            setattr(self, name, float(getattr(self, name)))
        for name in ("targets", "exclude"):
            value = list(getattr(self, name))
            if not all(isinstance(v, str) for v in value):
                raise SecateursError(f"recipe field {name} must be a list of globs, got {value!r}")
            setattr(self, name, value)
        if not self.targets:
            raise SecateursError("recipe field targets is empty: give at least one glob, e.g. '*'")
        self.data = self.data.strip().lower()
        if self.data not in DATA:
            raise SecateursError(f"unknown data {self.data!r}: choose one of {', '.join(DATA)}")
        if not 0.0 <= self.bias <= 1.0:
            raise SecateursError(f"bias must be a probability in [0, 1], got {self.bias}")
        self.model = self.model.strip().lower()
        from secateurs.train.models import MODELS

        if self.model not in MODELS:
            raise SecateursError(f"unknown model {self.model!r}: choose one of {', '.join(sorted(MODELS))}")
        self.optimizer = self.optimizer.strip().lower()
        if self.optimizer not in OPTIMIZERS:
            raise SecateursError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if isinstance(self.distribution, str) and self.distribution not in DISTRIBUTIONS:
            raise SecateursError(
                f"unknown distribution {self.distribution!r}: choose erk, uniform, or a mapping of layer -> sparsity"
            )
        if self.pattern is not None:
            nm = parse_nm(self.pattern)
            self.pattern, self.sparsity = str(nm), nm.sparsity
        self.sparsity = check_sparsity(self.sparsity)
        for name, low in (("epochs", 1), ("batch_size", 1), ("eval_every", 0), ("checkpoint_every", 0)):
            if getattr(self, name) < low:
                raise SecateursError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SecateursError(f"lr must be a positive number, got {self.lr}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise SecateursError("momentum and weight_decay must be >= 0")
        if "name" in self.method_options:
            raise SecateursError("method_options must not hold 'name': the method is the field method")
        self.method_options = self.method_config().options()

    def method_config(self):
        """The method as a config object (a typo or a wrong-typed setting is a :class:`SecateursError`)."""
        return method_from({"name": self.method.strip().lower(), **self.method_options})

    # ---- files
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return json.loads(json.dumps(out))  # plain lists and dicts, YAML-safe

    @classmethod
    def from_dict(cls, data) -> TrainConfig:
        if not isinstance(data, dict):
            raise SecateursError(f"a training recipe must be a mapping of fields, got {type(data).__name__}")
        data = dict(data)
        if isinstance(data.get("method"), dict):  # method: {name: rigl, alpha: 0.3}
            spec = dict(data["method"])
            data["method"] = spec.pop("name", None)
            data["method_options"] = {**spec, **(data.get("method_options") or {})}
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise SecateursError(f"unknown recipe field(s): {', '.join(unknown)} (known: {', '.join(known)})")
        for key in ("model_options", "method_options"):
            if data.get(key, {}) is None:
                data[key] = {}
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the recipe as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        Path(path).write_text(dumps(self.to_dict(), path))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a recipe (YAML or JSON, by suffix), or the ``metrics.json`` of a run (its ``config``)."""
        content = read_file(path)
        if isinstance(content, dict) and isinstance(content.get("config"), dict) and "evals" in content:
            content = content["config"]
        return cls.from_dict(content)


def load_data(config: TrainConfig):
    """The :class:`~secateurs.train.data.ImageData` the recipe names (coloured with its ``bias``)."""
    from secateurs.train import data as D

    base = config.data.removeprefix("coloured-")
    images = D.DATASETS[base](config.seed)
    return D.coloured(images, config.bias, config.seed) if config.data.startswith("coloured-") else images


def _build_model(config: TrainConfig, data) -> nn.Module:
    from secateurs.train.models import build_model

    torch.manual_seed(config.seed)
    try:
        return build_model(config.model, data, **config.model_options)
    except TypeError as exc:
        raise SecateursError(f"model {config.model}: bad model_options {config.model_options}: {exc}") from None


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def cosine_lr(base: float, step: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): a cosine from ``base`` to 0 over ``total`` steps."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def epoch_order(n: int, seed: int, epoch: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The training samples of ``epoch`` in order: a permutation (or, with ``weights``, ``n`` draws with
    replacement) from a generator seeded by (seed, epoch), so any epoch can be replayed on its own."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    if weights is not None:
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    return torch.randperm(n, generator=generator)


@torch.no_grad()
def evaluate(model: nn.Module, data, device: torch.device) -> dict:
    """Test loss and accuracy (and the bias groups' accuracy on coloured data), in eval mode."""
    from secateurs.train.data import group_accuracy

    was_training = model.training
    model.eval()
    logits = torch.cat(
        [
            model(data.test_x[i : i + EVAL_BATCH].to(device)).float().cpu()
            for i in range(0, len(data.test_y), EVAL_BATCH)
        ]
    )
    model.train(was_training)
    out = {
        "test_loss": float(nn.functional.cross_entropy(logits, data.test_y)),
        "accuracy": float((logits.argmax(1) == data.test_y).float().mean()),
    }
    if "test_aligned" in data.group:
        groups = group_accuracy(logits, data.test_y, data.group["test_aligned"], data.group.get("test_colour"))
        out.update({k: v for k, v in groups.items() if k != "accuracy"})
    return out


# ---- output folder and checkpoints
def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _fingerprint(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def save_checkpoint(output: Path, model, optimizer, sparse: SparseTraining, state: dict) -> None:
    """The three checkpoint files, each written atomically; ``checkpoint.json`` last (it names the step)."""
    from safetensors.torch import save_file

    step = str(state["step"])
    replace_file(
        output / "checkpoint.safetensors", lambda p: save_file(_plain_state(model), str(p), metadata={"step": step})
    )
    extra = {"step": state["step"], "optimizer": optimizer.state_dict(), "sparse": sparse.state_dict()}
    replace_file(output / "checkpoint.pt", lambda p: torch.save(extra, p))
    replace_file(output / "checkpoint.json", lambda p: p.write_text(json.dumps(state, indent=1) + "\n"))


def _recipe_diff(a: dict, b: dict) -> list[str]:
    """The recipe fields that differ (how often to checkpoint changes nothing of what is computed)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "checkpoint_every")


def load_checkpoint(output: Path, config: TrainConfig, model, optimizer, sparse: SparseTraining) -> dict:
    """Restore model, optimizer and sparse-training state from ``output``; return the loop state (step, evals)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = json.loads((output / "checkpoint.json").read_text())
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise ValueError("not a checkpoint of this version of secateurs")
        weights = load_file(str(output / "checkpoint.safetensors"))
        extra = torch.load(output / "checkpoint.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise SecateursError(f"cannot read the checkpoint in {output}: {str(exc).splitlines()[0]}") from None
    diff = _recipe_diff(state.get("recipe") or {}, config.to_dict())
    if diff:
        raise SecateursError(
            f"the checkpoint in {output} is from another recipe (differs in: {', '.join(diff)}): resume with the "
            f"recipe it saved ({output / 'recipe.yaml'}) or train into a new folder"
        )
    if state.get("model") != _fingerprint(model) or {k: list(v.shape) for k, v in weights.items()} != state["model"]:
        raise SecateursError(f"the checkpoint in {output} is from another model (its layers or shapes differ)")
    if not isinstance(extra, dict) or extra.get("step") != state["step"]:
        raise SecateursError(f"the checkpoint files in {output} are from different steps: delete them and start over")
    model.load_state_dict(weights)
    try:
        optimizer.load_state_dict(extra["optimizer"])
    except (ValueError, KeyError) as exc:
        raise SecateursError(f"the checkpoint in {output} holds another optimizer's state: {exc}") from None
    sparse.load_state_dict(extra["sparse"])
    return state


def _prepare_output(output: Path, resume: bool, overwrite: bool) -> bool:
    """Check the output folder; return whether a checkpoint is there to resume from."""
    if output.exists() and not output.is_dir():
        raise SecateursError(f"output {output} exists and is not a folder")
    has_checkpoint = (output / "checkpoint.json").is_file()
    busy = output.is_dir() and any(output.iterdir())
    if busy and not resume:
        ours = has_checkpoint or (output / "metrics.json").is_file() or (output / "recipe.yaml").is_file()
        if not overwrite:
            hint = "--resume to continue it, --overwrite to start over" if ours else "a new or empty folder"
            raise SecateursError(f"output folder {output} is not empty (use {hint})")
        if not ours:
            raise SecateursError(f"output folder {output} holds no training run: --overwrite only replaces one")
        for name in (*CHECKPOINT_FILES, *FINAL_FILES):
            (output / name).unlink(missing_ok=True)
        has_checkpoint = False
    if resume and not has_checkpoint:
        log.info("no checkpoint in %s: starting from step 0", output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SecateursError(f"cannot create output folder {output}: {exc.strerror or exc}") from None
    return resume and has_checkpoint


def _publish(output: Path, files: dict) -> None:
    """Write every ``{name: write(path)}`` into a hidden temporary folder in ``output`` (a writer may add files
    beside its own), then move each file into place, ``metrics.json`` last: an interrupted run never leaves a
    half-written final model."""
    tmp = output / f".final.partial-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name, write in files.items():
            write(tmp / name)
        follow_umask(tmp)
        names = sorted((p.name for p in tmp.iterdir() if p.is_file()), key=lambda n: n == "metrics.json")
        for name in names:
            os.replace(tmp / name, output / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_sparse_model(model: nn.Module, path: Path) -> None:
    """``model.sparse.safetensors`` and ``module.json`` beside it: the compact sparse format, which
    :func:`secateurs.load_sparse` runs on the CPU kernel."""
    from secateurs.checkpoint import save_sparse

    folder = path.parent / "sparse.partial"
    save_sparse(model, folder, progress=False)
    for item in folder.iterdir():
        os.replace(item, path.parent / item.name)
    folder.rmdir()


# ---- the loop
def train(
    config: TrainConfig,
    output: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    *,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    stop_after: int | None = None,
    plots: bool = True,
    save_format: str = "safetensors",
) -> dict:
    """Sparse-train the recipe's model on its data; return the metrics (also ``output/metrics.json``).

    ``output``: the run's folder (checkpoints, ``recipe.yaml``, then ``model.safetensors``, ``metrics.json``,
    ``plots.png``); None keeps nothing. ``resume``: continue from the checkpoint there (it must come from the same
    recipe). ``stop_after``: stop once that many optimizer steps are done in all (checkpointing there), e.g. to
    split a run in parts; the final files are written only when the run is complete. ``save_format``:
    ``safetensors`` (``model.safetensors``, the plain state dict) or ``sparse`` (``model.sparse.safetensors`` and
    ``module.json``: the compact format, which :func:`secateurs.load_sparse` runs on the CPU kernel).
    """
    from tqdm.auto import tqdm

    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    device = torch.device(device)
    out = Path(output).expanduser().absolute() if output is not None else None
    if resume and out is None:
        raise SecateursError("resume needs the output folder of the run to continue")
    if save_format not in SAVE_FORMATS:
        raise SecateursError(f"unknown save format {save_format!r}: use {' or '.join(SAVE_FORMATS)}")
    if stop_after is not None and stop_after < 1:
        raise SecateursError(f"stop_after must be a positive number of steps, got {stop_after}")
    method = config.method_config()
    data = load_data(config)
    weights = None
    if hasattr(method, "sample_weights"):  # REST: bias-conflicting samples drawn more often
        if "train_aligned" not in data.group:
            raise SecateursError(f"{method.name} needs data with bias groups: use data coloured-digits")
        weights = method.sample_weights(~data.group["train_aligned"])
    n = len(data.train_y)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    eval_every = config.eval_every or steps_per_epoch
    checkpoint_every = config.checkpoint_every or steps_per_epoch

    model = _build_model(config, data).to(device)
    optimizer = _optimizer(config, model)
    sparse = SparseTraining(
        model,
        optimizer,
        method,
        sparsity=config.sparsity,
        distribution=config.distribution,
        targets=config.targets,
        exclude=config.exclude,
        pattern=config.pattern,
        total_steps=total,
        seed=config.seed,
    )
    recipe = config.to_dict()
    state = {
        "version": CHECKPOINT_VERSION,
        "step": 0,
        "evals": [],
        "loss_sum": 0.0,
        "loss_count": 0,
        "wall_seconds": 0.0,
        "recipe": recipe,
        "model": _fingerprint(model),
    }
    resumed_from = None
    if out is not None:
        if _prepare_output(out, resume, overwrite):
            state = load_checkpoint(out, config, model, optimizer, sparse)
            resumed_from = state["step"]
            log.info("resuming %s from step %d of %d", out, resumed_from, total)
        replace_file(out / "recipe.yaml", lambda p: p.write_text(dumps(recipe, "recipe.yaml")))
    end = total if stop_after is None else min(total, stop_after)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    model.train()
    t0 = time.perf_counter()
    wall_before = state["wall_seconds"]
    bar = tqdm(total=total, initial=state["step"], disable=not progress, desc=f"{method.name} {config.data}")
    with PeakMemory() as memory:
        step = state["step"]
        while step < end:
            epoch, offset = divmod(step, steps_per_epoch)
            order = epoch_order(n, config.seed, epoch, weights).to(device)
            for start in range(offset * config.batch_size, n, config.batch_size):
                if step >= end:
                    break
                index = order[start : start + config.batch_size]
                x, y = train_x[index], train_y[index]
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(config.lr, step, total)
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                sparse.step()
                step += 1
                state["step"] = step
                state["loss_sum"] += float(loss.detach())
                state["loss_count"] += 1
                bar.update(1)
                if step % eval_every == 0 or step == total:
                    record = {
                        "step": step,
                        "epoch": step / steps_per_epoch,
                        "lr": cosine_lr(config.lr, step - 1, total),
                        "train_loss": state["loss_sum"] / max(state["loss_count"], 1),
                        **evaluate(model, data, device),
                        "sparsity": sparse.overall_sparsity(),
                    }
                    state["evals"].append(record)
                    state["loss_sum"], state["loss_count"] = 0.0, 0
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['accuracy']:.3f}")
                if out is not None and (step % checkpoint_every == 0 or step == end):
                    state["wall_seconds"] = wall_before + time.perf_counter() - t0
                    save_checkpoint(out, model, optimizer, sparse, state)
    bar.close()
    wall = wall_before + time.perf_counter() - t0
    if step < total:
        log.info("stopped after step %d of %d: resume with the same output folder", step, total)
        return {"config": recipe, "step": step, "total_steps": total, "complete": False, "evals": state["evals"]}

    summary = sparse.summary()
    mask_bytes = sparse.mask_bytes()
    history = list(sparse.history)
    names = list(sparse.layers)
    model = sparse.finalize().cpu()
    by_layer = {}
    with torch.no_grad():
        for name in names:
            w = model.get_submodule(name).weight
            by_layer[name] = {
                "zeros": int((w == 0).sum()),
                "numel": w.numel(),
                "sparsity": float((w == 0).mean(dtype=torch.float)),
            }
    zeros, numel = sum(v["zeros"] for v in by_layer.values()), sum(v["numel"] for v in by_layer.values())
    metrics = {
        "config": recipe,
        "complete": True,
        "data": {
            "name": data.name,
            "train": n,
            "test": len(data.test_y),
            "classes": data.classes,
            "input_shape": list(data.input_shape),
        },
        "model": {"name": config.model, "parameters": sum(p.numel() for p in model.parameters())},
        "method": summary["method"],
        "total_steps": total,
        "steps_per_epoch": steps_per_epoch,
        "evals": state["evals"],
        "final": state["evals"][-1] if state["evals"] else None,
        "sparsity": {"overall": zeros / max(numel, 1), "by_layer": by_layer},
        "densities": {k: v["density"] for k, v in summary["layers"].items()},
        "history": history,
        "updates": len(history),
        "mask_bytes": mask_bytes,
        "wall_seconds": wall,
        "peak_memory": {"rss_bytes": memory.peak_rss, "cuda_bytes": memory.peak_cuda},
        "resumed_from": resumed_from,
        "output": str(out) if out is not None else None,
        "versions": versions(),
    }
    if out is not None:
        from safetensors.torch import save_file

        meta = {"format": "pt", "recipe": json.dumps(recipe)}
        if save_format == "sparse":
            files = {"model.sparse.safetensors": lambda p: _write_sparse_model(model, p)}
        else:
            files = {"model.safetensors": lambda p: save_file(_plain_state(model), str(p), metadata=meta)}
        if plots:
            files["plots.png"] = lambda p: plot_metrics(metrics, p)
        files["metrics.json"] = lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n")
        _publish(out, files)
        log.info("saved %s (test accuracy %.4f, sparsity %.4f)", out, metrics["final"]["accuracy"], zeros / numel)
    return metrics


def plot_metrics(metrics: dict, path: str | Path) -> None:
    """``plots.png``: test accuracy and losses over steps, per-layer sparsity, mask churn per update."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_sparse, ax_churn = fig.subplots(1, 3)
    evals = metrics["evals"]
    steps = [r["step"] for r in evals]
    ax_acc.plot(steps, [r["accuracy"] for r in evals], "o-", color="C0", label="test accuracy")
    for key, style, colour in (("conflicting", "s--", "C4"), ("worst_group", "^:", "C1")):
        if evals and key in evals[0]:
            ax_acc.plot(steps, [r[key] for r in evals], style, color=colour, label=key.replace("_", " "))
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy and loss")
    ax_loss = ax_acc.twinx()
    ax_loss.plot(steps, [r["test_loss"] for r in evals], color="C3", alpha=0.6, label="test loss")
    ax_loss.plot(steps, [r["train_loss"] for r in evals], color="C2", alpha=0.6, label="train loss")
    ax_loss.set_ylabel("loss")
    lines = ax_acc.get_legend_handles_labels()
    more = ax_loss.get_legend_handles_labels()
    ax_acc.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="center right")
    layers = metrics["sparsity"]["by_layer"]
    ax_sparse.barh(list(layers)[::-1], [v["sparsity"] for v in layers.values()][::-1], color="C1")
    ax_sparse.set(xlim=(0, 1), xlabel="sparsity (from the final weights)", title="sparsity per layer")
    ax_sparse.tick_params(axis="y", labelsize=7)
    history = metrics["history"]
    if history:
        for name in history[0]["layers"]:
            ax_churn.plot([h["step"] for h in history], [h["layers"][name]["churn"] for h in history], ".-", label=name)
        ax_churn.legend(fontsize=7)
    else:
        ax_churn.text(0.5, 0.5, "no mask updates", ha="center", va="center", transform=ax_churn.transAxes)
    ax_churn.set(xlabel="step", ylabel="dropped / active", title="mask churn per update")
    fig.suptitle(f"{metrics['method']['name']} on {metrics['data']['name']}, {metrics['config']['model']}")
    fig.savefig(path, format="png", dpi=90)
