"""Kernel-level dynamic sparsity for convolutions (E2ENet's dynamic sparse feature fusion, DSFF).

The unit of sparsity is a whole kernel, one per (output channel, input channel) pair of a Conv1d/2d/3d: a
channel-to-channel connection is on or off. As in the reference (boqian333/E2ENet-Medical,
``sparselearning/core_channel.py``): kernels are dropped by their L1 norm, the drop fraction starts at 0.5 and
decays by a cosine, and as many kernels are regrown at random among the inactive ones (``growth="gradient"``
regrows by the L1 norm of the kernel's dense gradient instead); a regrown kernel starts at zero, with no
momentum. Differences: the reference decays the fraction to 0.001 over the whole run and counts with ceil;
here it decays to 0 at ``end`` and counts with floor, like RigL. A Linear's kernel is one weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from secateurs.oneshot.stage import option
from secateurs.train.methods.rigl import RigL


@dataclass(frozen=True)
class KernelRigL(RigL):
    """Dynamic sparsity over whole convolution kernels (DSFF): drop by kernel norm, regrow at random or by gradient."""

    name: ClassVar[str] = "kernel-rigl"
    summary: ClassVar[str] = "dynamic sparsity over whole conv kernels: drop by kernel norm, regrow (E2ENet's DSFF)"

    alpha: float = option(0.5, "initial drop fraction, decayed by a cosine to 0 at end")
    end: float = option(1.0, "last mask update, as a fraction of the run")
    growth: str = option("random", "how dropped kernels are replaced: random (the reference) or gradient")
    granularity: str = option("kernel", "unit of sparsity: kernel (a whole conv kernel per channel pair) or weight")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.growth in ("random", "gradient"), f"growth must be random or gradient, not {self.growth!r}")

    @property
    def grows_by_gradient(self) -> bool:  # type: ignore[override]
        return self.growth == "gradient"
