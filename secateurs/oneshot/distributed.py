"""Pruning on several processes with torch.distributed: the calibration windows are shared out, the sums are not.

Every rank holds the whole model and runs its own contiguous share of the calibration windows through each decoder
layer. The input statistics a recipe's stages declare are sums over tokens, so they are all-reduced (summed over the
ranks) before any stage runs: every rank then runs the same stages on the same sums and computes the same masks,
those of one process on all the windows (the sums are added in fp64 and rounded to fp32 once, see
:mod:`secateurs.oneshot.stats`). Only rank 0 writes anything.

Started by ``torchrun`` (``torchrun --standalone --nproc-per-node N -m secateurs prune ...``, or a multi-node
rendezvous, unchanged), the command line joins the process group itself: gloo on CPU, NCCL on CUDA (one GPU per
local rank). From Python, initialise the process group and call :func:`secateurs.prune` on every rank.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from secateurs.errors import SecateursError
from secateurs.oneshot.stats import InputStats

log = logging.getLogger(__name__)

# how long a rank waits for the others in one collective: rank 0 may evaluate the dense model alone first
TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the pruning processes (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """Whether this process writes files, logs progress and evaluates."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` windows (shares differ in size by at most one)."""
        if n < self.world:
            raise SecateursError(f"{n} calibration windows for {self.world} processes: each needs at least one")
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def sum_stats(self, stats: Iterable[tuple[InputStats, int]]) -> None:
        """Sum each (statistics, input width) over the ranks, in place; a rank that saw no token of an input (an
        expert nobody routed to) contributes zeros. Distinct objects only: linears that share an input share one."""
        if not self.several:
            return
        for s, cols in stats:
            counts = torch.tensor([s.nsamples, s.ntokens], dtype=torch.float64)
            present = torch.tensor([total is not None for total in s.sums().values()], dtype=torch.float64)
            device = next((t.device for t in s.sums().values() if t is not None), None)
            counts, present = self._reduce(counts, device), self._reduce(present, device)
            s.nsamples, s.ntokens = int(counts[0].item()), int(counts[1].item())
            for (name, total), anywhere in zip(s.sums().items(), present.tolist(), strict=True):
                if not anywhere:
                    continue
                if total is None:
                    shape = (cols, cols) if name == "H_sum" else (cols,)
                    total = torch.zeros(shape, dtype=torch.float64, device=device or "cpu")
                setattr(s, name, self._reduce(total, total.device))

    def broadcast(self, obj: object) -> object:
        """Rank 0's ``obj``, on every rank (pickled between the ranks of this run only)."""
        if not self.several:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_floats(self, *values: float) -> list[float]:
        if not self.several:
            return list(values)
        return self._reduce(torch.tensor(values, dtype=torch.float64), None).tolist()

    def _reduce(self, tensor: torch.Tensor, device) -> torch.Tensor:
        if dist.get_backend() == "nccl":
            device = device if device is not None and device.type == "cuda" else torch.device("cuda")
        else:
            device = torch.device("cpu")
        moved = tensor.to(device)
        dist.all_reduce(moved)
        return moved.to(tensor.device)

    def check_same(self, **parts: object) -> None:
        """Refuse to go on unless every rank was started with the same ``parts`` (recipe, windows, model ...),
        naming the first that differs and the ranks that disagree."""
        if not self.several:
            return
        digests = {name: digest(value) for name, value in parts.items()}
        gathered: list[dict] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(gathered, digests)
        for name in parts:
            differ = [r for r, d in enumerate(gathered) if d[name] != gathered[0][name]]
            if differ:
                ranks = ", ".join(str(r) for r in differ)
                raise SecateursError(
                    f"the processes were started with different {name}s: rank{'s' * (len(differ) > 1)} {ranks} "
                    f"differ{'s' * (len(differ) == 1)} from rank 0; start every rank with the same command"
                )


def digest(value: object) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes, or of a JSON-able value."""
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu").contiguous()
        payload = f"{data.dtype}{tuple(data.shape)}".encode() + data.view(torch.uint8).numpy().tobytes()
    else:
        payload = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()


def join_from_environment(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group ``torchrun`` describes in the environment (WORLD_SIZE > 1), if not joined yet:
    NCCL with one GPU per local rank when ``device`` is CUDA, gloo otherwise. Returns the ranks and the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise SecateursError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible)")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        log.debug("joined the process group: rank %d of %d, %s", dist.get_rank(), world, dist.get_backend())
    elif dist.is_initialized() and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return Ranks.current(), device


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
