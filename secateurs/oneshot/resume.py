"""Resumable pruning: after every decoder layer what is done is on disk, and a stopped run continues from there.

A run's folder holds ``state.json`` (what the run is: recipe, calibration windows, model; the per-layer targets the
allocation chose; how many layers are done) and one ``layer-NNNNN.safetensors`` per finished decoder layer: the
pruned weights of its linears, their masks, its result and the random number generators' state after it. Each file
is written beside its final name and renamed into place, and ``state.json`` counts a layer only once its file is
complete, so a run killed at any instant (Ctrl-C, SIGKILL, a crash, a power cut after the rename) leaves a folder
to continue from.

Continuing restores the finished layers' weights, recomputes the hidden states entering the next layer by running
the calibration windows through those layers (the very operations of an uninterrupted run, so the result is
bit-identical on the same machine and device kind), and walks on. The hidden states are not stored: for a 7B
model and the paper protocol they are 4 GB per layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from secateurs.errors import SecateursError
from secateurs.oneshot.result import LayerResult, LinearResult, PackedMask

log = logging.getLogger(__name__)

STATE = "state.json"
FORMAT = 1


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model: its class, config, and every tensor's name, shape, dtype and first values."""
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        if tensor.device.type != "meta" and tensor.numel():
            head = tensor.detach().reshape(-1)[:16].to("cpu").contiguous()
            h.update(head.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def layer_file(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


class RunState:
    """The on-disk progress of one pruning run (see the module docstring). Only the writing process saves."""

    def __init__(self, directory: str | Path, identity: dict, *, write: bool = True):
        self.directory = Path(directory).expanduser().absolute()
        self.identity = identity
        self.write = write
        self.done = 0  # decoder layers finished, in order
        self.allocation: dict | None = None  # {"sparsities": [...], "measures": [...] | None}

    # --- opening ---------------------------------------------------------------------------------------------
    def open(self, resume: bool) -> RunState:
        """Start a new run here, or (``resume``) continue the stopped one if it is the same run.

        Refuses a folder holding a stopped run unless ``resume``, and a stopped run of another recipe, model or
        calibration, naming what differs."""
        state_path = self.directory / STATE
        if not state_path.is_file():
            if self.directory.exists() and any(self.directory.iterdir()):
                raise SecateursError(f"{self.directory} exists and holds no pruning run ({STATE} is missing)")
            if resume:
                log.info("nothing to resume in %s: starting from the first layer", self.directory)
            self._save_state()
            return self
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError) as exc:
            raise SecateursError(f"cannot read {state_path}: {exc}") from None
        done = int(state.get("layers_done", 0))
        if not resume:
            raise SecateursError(
                f"{self.directory} holds a stopped run ({done} layer{'s' * (done != 1)} done): --resume "
                "(resume=True) continues it; --overwrite (or removing the folder) starts again"
            )
        differ = _first_difference(state.get("identity", {}), self.identity)
        if differ:
            raise SecateursError(f"cannot resume from {self.directory}: it is a run with another {differ}")
        for index in range(done):
            if not (self.directory / layer_file(index)).is_file():
                raise SecateursError(f"cannot resume from {self.directory}: {layer_file(index)} is missing")
        self.done, self.allocation = done, state.get("allocation")
        log.info("resuming from %s: %d layer%s already pruned", self.directory, done, "s" * (done != 1))
        return self

    # --- saving ----------------------------------------------------------------------------------------------
    def save_allocation(self, sparsities: list[float], measures: list[dict] | None) -> None:
        self.allocation = {"sparsities": list(sparsities), "measures": measures}
        self._save_state()

    def save_layer(
        self, index: int, weights: dict[str, torch.Tensor], masks: dict[str, PackedMask], result: LayerResult
    ) -> None:
        """Record decoder layer ``index`` as finished (layers finish in order)."""
        if index != self.done:
            raise RuntimeError(f"layer {index} finished after {self.done} layers")
        if self.write:
            tensors = {f"{name}.weight": w.detach().to("cpu").contiguous() for name, w in weights.items()}
            for name, packed in masks.items():
                tensors[f"{name}.mask_bits"] = packed.bits.contiguous()
            tensors["rng.cpu"] = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                tensors["rng.cuda"] = torch.cuda.get_rng_state()
            meta = {
                "result": json.dumps(asdict(result)),
                "mask_shapes": json.dumps({n: m.shape for n, m in masks.items()}),
            }
            path = self.directory / layer_file(index)
            tmp = path.with_name(path.name + ".tmp")
            save_file(tensors, str(tmp), metadata=meta)
            _sync(tmp)
            os.replace(tmp, path)
        self.done = index + 1
        self._save_state()

    def _save_state(self) -> None:
        if not self.write:
            return
        state = {"format": FORMAT, "identity": self.identity, "layers_done": self.done, "allocation": self.allocation}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / (STATE + ".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            _sync(tmp)
            os.replace(tmp, self.directory / STATE)
        except OSError as exc:
            raise SecateursError(
                f"cannot write the run's progress in {self.directory}: {exc.strerror or exc}"
            ) from None

    # --- loading ---------------------------------------------------------------------------------------------
    def load_layer(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, PackedMask], LayerResult, dict]:
        """A finished layer: its pruned weights and masks by full linear name, its result, and the RNG states."""
        path = self.directory / layer_file(index)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            raw = json.loads(meta["result"])
            shapes = json.loads(meta["mask_shapes"])
        except Exception as exc:  # a damaged file: say which, never continue from it
            raise SecateursError(f"cannot resume: {path} is damaged ({exc})") from None
        weights = {k.removesuffix(".weight"): v for k, v in tensors.items() if k.endswith(".weight")}
        masks = {n: PackedMask(tensors[f"{n}.mask_bits"], tuple(shape)) for n, shape in shapes.items()}
        raw["linears"] = [LinearResult(**{**lin, "shape": tuple(lin["shape"])}) for lin in raw["linears"]]
        rng = {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
        return weights, masks, LayerResult(**raw), rng

    def remove(self) -> None:
        if self.write:
            shutil.rmtree(self.directory, ignore_errors=True)


def restore_rng(rng: dict) -> None:
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _first_difference(saved: dict, current: dict) -> str | None:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            detail = ""
            a, b = saved.get(key), current.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                detail = f" ({', '.join(f'{k}: {a.get(k)!r} then, {b.get(k)!r} now' for k in keys[:3])})"
            return f"{key}{detail}"
    return None


def _sync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
