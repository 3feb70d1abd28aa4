"""Kernel-level dynamic sparsity for convolutions (E2ENet's dynamic sparse feature fusion, Liu et al. 2024).

The unit of sparsity is a whole kernel, one per (output channel, input channel) pair of a Conv1d/2d/3d: a
channel-to-channel connection is on or off. Kernels are dropped by their L1 norm and regrown by the L1 norm of
their dense gradient, on RigL's schedule; a regrown kernel starts at zero. A Linear's kernel is one weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from secateurs.oneshot.stage import option
from secateurs.train.methods.rigl import RigL


@dataclass(frozen=True)
class KernelRigL(RigL):
    """RigL over whole convolution kernels (DSFF)."""

    name: ClassVar[str] = "kernel-rigl"
    summary: ClassVar[str] = "dynamic sparsity over whole conv kernels, dropped by norm and regrown by gradient (DSFF)"

    granularity: str = option("kernel", "unit of sparsity: kernel (a whole conv kernel per channel pair) or weight")
