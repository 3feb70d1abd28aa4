"""Step 1 of the walk: record what every decoder layer is called with, without rebuilding any argument by hand.

The calibration windows run through the embeddings while every decoder layer is replaced by a pass-through that
records its call: the hidden states entering the first layer, and every other argument of every layer (attention
masks, position embeddings ... which may differ per layer, e.g. sliding-window layers). This costs almost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.models import find_layers


@dataclass
class LayerCall:
    """The arguments a decoder layer was called with, other than the hidden states."""

    args: tuple
    kwargs: dict

    def __call__(self, layer: Callable, hidden: torch.Tensor):
        return layer(hidden, *self.args, **self.kwargs)


class LastLayerRecorded(Exception):
    """Raised by the recorder once the last decoder layer's call is recorded: the rest of the forward pass (the
    final norm and the LM head, 262k wide on Gemma 3) is not needed and is not run."""


class Recorder:
    """Stands in for every decoder layer during capture: records the call, passes hidden states through."""

    def __init__(self, layers: nn.ModuleList, keep_inputs_of_first: bool = True):
        self.layers = layers
        self.inputs: list[torch.Tensor] = []  # hidden states entering layer 0, one per window
        self.calls: list[list[LayerCall]] = [[] for _ in layers]  # per layer, per window: the other arguments
        self.tuple_output: bool | None = None
        self._saved = []

    def __enter__(self):
        for index, layer in enumerate(self.layers):
            self._saved.append(layer.forward)
            layer.forward = self._make(index, layer.forward)
        return self

    def __exit__(self, *exc):
        for layer, forward in zip(self.layers, self._saved, strict=True):
            layer.forward = forward
        self._saved.clear()

    def _make(self, index: int, real_forward: Callable):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            call = LayerCall(args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            if index == 0:
                self.inputs.append(hidden)
            if self.tuple_output is None:  # learn the layer's output convention from one real call
                self.tuple_output = isinstance(call(real_forward, hidden), tuple)
            self.calls[index].append(call)
            if index == len(self.layers) - 1:
                raise LastLayerRecorded
            return (hidden,) if self.tuple_output else hidden

        return forward


def layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class OnDevice:
    """Move everything except the decoder layers to the compute device, and back afterwards."""

    def __init__(self, model: nn.Module, layers_name: str, device: torch.device):
        self.model, self.layers_name, self.device = model, layers_name, device

    def _move(self, device) -> None:
        parent_name, _, attr = self.layers_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layers = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList())
        try:  # tensors on the meta device (a streamed model's, not read in) stay there
            self.model._apply(lambda t: t if t.device.type == "meta" else t.to(device))
        finally:
            setattr(parent, attr, layers)

    def __enter__(self):
        self.home = next((p.device for p in self.model.parameters() if p.device.type != "meta"), self.device)
        if self.home != self.device:
            self._move(self.device)
        return self

    def __exit__(self, *exc):
        if self.home != self.device:
            self._move(self.home)


@torch.no_grad()
def capture(model: nn.Module, calibration: torch.Tensor, device: torch.device, progress: bool = True, batch: int = 1):
    """Record the first layer's input hidden states and every layer's keyword arguments, per batch of ``batch``
    windows (each hidden state [batch, seqlen, hidden]; the last batch may be smaller)."""
    rec = record(model, calibration, device, progress, batch)
    return rec.inputs, rec.calls


class Replay:
    """``with Replay(layers, tuple_output) as replay:`` every decoder layer passes its input through, except the last,
    which returns ``replay.output``: the model's own forward then applies what follows the layers (final norm, LM
    head) to hidden states computed layer by layer elsewhere (a streamed model's, whose layers are not in memory)."""

    def __init__(self, layers: nn.ModuleList, tuple_output: bool):
        self.layers, self.tuple_output = layers, tuple_output
        self.output: torch.Tensor | None = None
        self._saved = []

    def __enter__(self):
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            self._saved.append(layer.forward)
            layer.forward = self._make(index == last)
        return self

    def __exit__(self, *exc):
        for layer, forward in zip(self.layers, self._saved, strict=True):
            layer.forward = forward
        self._saved.clear()

    def _make(self, last: bool):
        def forward(*args, **kwargs):
            hidden = self.output if last else (args[0] if args else kwargs["hidden_states"])
            return (hidden,) if self.tuple_output else hidden

        return forward


@torch.no_grad()
def record(
    model: nn.Module,
    calibration: torch.Tensor | Sequence[torch.Tensor],
    device: torch.device,
    progress: bool = True,
    batch: int = 1,
) -> Recorder:
    """The capture pass: the :class:`Recorder` holding each window's (or batch of ``batch`` windows') inputs to layer
    0 and every layer's arguments (and the layers' output convention). ``calibration`` may also be a list of
    batches of token ids, each [rows, length] with its own length (``batch`` is then not used)."""
    layers_name, layers = find_layers(model)
    layer0_home = next(layers[0].parameters()).device
    layers[0].to(device)
    batches = calibration.split(batch) if isinstance(calibration, torch.Tensor) else calibration
    try:
        with OnDevice(model, layers_name, device), Recorder(layers) as rec:
            for rows in tqdm(batches, desc="capturing inputs", disable=not progress, leave=False):
                try:
                    model(input_ids=rows.to(device), use_cache=False)
                except LastLayerRecorded:
                    pass
    finally:
        layers[0].to(layer0_home)
    for per_layer in rec.calls:
        for call in per_layer:
            for key in ("past_key_values", "past_key_value", "layer_past"):
                if key in call.kwargs:
                    call.kwargs[key] = None
    return rec


@torch.no_grad()
def through_layers(
    model: nn.Module,
    residence,
    batches: torch.Tensor | Sequence[torch.Tensor],
    device: torch.device,
    progress: bool = True,
    desc: str = "layer by layer",
) -> tuple[list[torch.Tensor], bool]:
    """Run token ids through a model whose decoder layers are not in memory, one layer at a time: (the last layer's
    output for each batch, whether the layers return tuples). ``batches``: as :func:`record` takes them (a
    [n, seqlen] tensor is run one row at a time). ``residence`` (a :class:`~secateurs.oneshot.streaming.Streamed`)
    reads each layer in before it runs over every batch and drops it after, then reads everything outside the
    layers back in, so that the model's own forward under :class:`Replay` applies the final norm and the head.
    Holds the hidden states of every batch at once, and one layer."""
    _, layers = find_layers(model)
    residence.prepare(layers)
    rec = record(model, batches, device, progress)
    hidden, calls = rec.inputs, rec.calls
    for index in tqdm(range(len(layers)), desc=desc, disable=not progress):
        residence.enter(index, layers[index], device)
        for j, call in enumerate(calls[index]):
            hidden[j] = layer_output(call(layers[index], hidden[j]))
        calls[index] = None
        residence.leave(index, layers[index], final=False)
    residence.load_outside()
    return hidden, bool(rec.tuple_output)
