"""AdaMerging (Yang et al., ICLR 2024, arXiv 2310.02575): learn the merge coefficients on unlabelled inputs.

theta = theta_0 + sum_t lambda_t tau_t (task-wise), or theta^l = theta_0^l + sum_t lambda_t^l tau_t^l with one
coefficient per task and per tensor (layer-wise, as the reference code does it: every parameter tensor is a
"layer"). The lambdas start at ``init`` (0.3) and Adam minimises the sum over tasks of the mean entropy of the
merged model's predictions on a batch of that task's unlabelled (test) inputs; the lambdas used are clamped to
[0, 1] as in the reference code. The merged weights stay a differentiable function of lambda through
``torch.func.functional_call``, so any ``nn.Module`` works, and a task can keep its own head (``task_tensors``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.merge.functional import Forward, entropy, forward
from secateurs.merge.tensors import Tensors, check_match

log = logging.getLogger("secateurs")

GRANULARITIES = ("task", "layer")


@dataclass
class AdaMerging:
    """Settings of AdaMerging. The paper's: init 0.3, Adam lr 1e-3, 500 steps, batches of 16 per task."""

    granularity: str = "layer"
    init: float = 0.3
    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 16
    clamp: tuple[float, float] | None = (0.0, 1.0)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise SecateursError(f"AdaMerging granularity must be task or layer, got {self.granularity!r}")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise SecateursError(f"AdaMerging needs steps >= 0, batch_size >= 1, lr > 0 (got {self})")
        if self.clamp is not None:
            self.clamp = (float(self.clamp[0]), float(self.clamp[1]))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["clamp"] = list(self.clamp) if self.clamp is not None else None
        return {"method": f"adamerging-{self.granularity}", **out}


@dataclass
class AdaMergingResult:
    """The learned coefficients ([tasks] task-wise, [tensors, tasks] layer-wise, clamped as used), the tensor
    names of the rows, the merged tensors, and the summed entropy at every step (before its update)."""

    coefficients: torch.Tensor
    names: list[str]
    tensors: Tensors
    history: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {"entropy_first": self.history[0] if self.history else None}
        out["entropy_last"] = self.history[-1] if self.history else None
        if self.coefficients.dim() == 1:
            return {**out, "coefficients": self.coefficients.tolist()}
        rows = {name: row.tolist() for name, row in zip(self.names, self.coefficients, strict=True)}
        return {**out, "coefficients": rows}


def merged_tensors(
    base: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]], coefficients: torch.Tensor
) -> Tensors:
    """theta_0 + sum_t lambda_t tau_t per tensor, differentiable in ``coefficients`` ([tasks] or [tensors, tasks],
    rows in the order of ``base``); float32 where the base is (the base's dtype otherwise)."""
    out = {}
    for row, (name, b) in enumerate(base.items()):
        lam = coefficients if coefficients.dim() == 1 else coefficients[row]
        merged = b.float() + sum(lam[t] * v[name].float() for t, v in enumerate(vectors))
        out[name] = merged if b.dtype == torch.float32 else merged.to(b.dtype)
    return out


def _batch(inputs: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    if len(inputs) <= size:
        return inputs
    return inputs[torch.randperm(len(inputs), generator=generator)[:size].to(inputs.device)]


def adamerge(
    model: nn.Module,
    base: Mapping[str, torch.Tensor],
    vectors: Sequence[Mapping[str, torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    config: AdaMerging | None = None,
    *,
    task_tensors: Sequence[Mapping[str, torch.Tensor]] | None = None,
    loss: Callable[[torch.Tensor], torch.Tensor] = entropy,
    call: Forward = forward,
    progress: bool = False,
) -> AdaMergingResult:
    """Learn AdaMerging's coefficients for merging ``vectors`` (task vectors of ``base``'s tensors) into ``model``.

    ``inputs[t]``: task t's unlabelled inputs (a tensor, batches drawn from its first dimension, seeded);
    ``task_tensors[t]``: tensors of task t used with the merged ones (its own head), not merged; ``loss`` maps the
    outputs to the quantity minimised (mean entropy); ``call`` runs the model with given tensors. The model's own
    tensors are not changed; it runs in eval mode.
    """
    config = config or AdaMerging()
    if not vectors:
        raise SecateursError("AdaMerging needs at least one task vector")
    if len(inputs) != len(vectors):
        raise SecateursError(f"AdaMerging needs unlabelled inputs for each task: {len(vectors)} tasks, {len(inputs)}")
    if task_tensors is not None and len(task_tensors) != len(vectors):
        raise SecateursError(f"task_tensors: {len(task_tensors)} for {len(vectors)} tasks")
    for t, v in enumerate(vectors):
        check_match(base, v, f"task vector {t}")
    names = list(base)
    tasks = len(vectors)
    shape = (tasks,) if config.granularity == "task" else (len(names), tasks)
    raw = torch.full(shape, float(config.init), requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=config.lr, betas=(0.9, 0.999))
    generator = torch.Generator().manual_seed(config.seed)
    base = {k: v.detach() for k, v in base.items()}
    vectors = [{k: v.detach() for k, v in vec.items()} for vec in vectors]

    def used() -> torch.Tensor:
        return raw.clamp(*config.clamp) if config.clamp is not None else raw

    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    history = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for step in range(config.steps):
            merged = merged_tensors(base, vectors, used())
            total = torch.zeros(())
            for t in range(tasks):
                x = _batch(inputs[t], config.batch_size, generator)
                own = task_tensors[t] if task_tensors is not None else {}
                total = total + loss(call(model, {**merged, **own}, x))
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            history.append(float(total.detach()))
            if progress and (step % 50 == 0 or step == config.steps - 1):
                log.info("AdaMerging step %d/%d: entropy %.4f", step + 1, config.steps, history[-1])
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    with torch.no_grad():
        coefficients = used().detach().clone()
        tensors = {k: v.detach() for k, v in merged_tensors(base, vectors, coefficients).items()}
    return AdaMergingResult(coefficients, names, tensors, history)
