"""N:M sparsity learned from scratch with SR-STE (Zhou et al. 2021).

The forward uses W~ = W * M, with M the N:M mask of |W| recomputed at every forward; the backward passes the
gradient of W~ straight through to the dense W and adds the sparse-refined term lambda_W * (not M) * W, which
decays the pruned weights so the mask settles. At the end the weights are W * M: exactly N:M.
Convention: N:M here means N zeros in every M (as everywhere in secateurs); for 2:4 and 4:8 it is the
reference's pattern too (the reference counts the kept weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from secateurs.oneshot.select import NM
from secateurs.oneshot.stage import option
from secateurs.train import masks as M
from secateurs.train.method import Method


class _SparseRefined(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, keep, decay):
        ctx.save_for_backward(weight, keep)
        ctx.decay = decay
        return weight * keep

    @staticmethod
    def backward(ctx, grad):
        weight, keep = ctx.saved_tensors
        return grad + ctx.decay * (~keep) * weight, None, None


def sr_ste(weight: torch.Tensor, nm: NM, decay: float) -> torch.Tensor:
    """W * M(|W|) in the forward; grad + decay * (not M) * W reaches W in the backward."""
    return _SparseRefined.apply(weight, M.nm_keep(weight, nm).to(weight.device), decay)


class NMParametrization(nn.Module):
    """The parametrization SR-STE puts on a weight (``torch.nn.utils.parametrize``)."""

    def __init__(self, nm: NM, decay: float) -> None:
        super().__init__()
        self.nm, self.decay = nm, decay

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return sr_ste(weight, self.nm, self.decay)


@dataclass(frozen=True)
class SRSTE(Method):
    """Straight-through N:M training with the sparse-refined decay on pruned weights."""

    name: ClassVar[str] = "srste"
    summary: ClassVar[str] = "N:M from scratch: straight-through estimator with sparse-refined decay (Zhou et al.)"
    straight_through: ClassVar[bool] = True
    supports_pattern: ClassVar[bool] = True

    decay: float = option(2e-4, "lambda_W: the sparse-refined decay of pruned weights")

    def __post_init__(self) -> None:
        self.check(self.decay >= 0, f"decay must be >= 0, got {self.decay}")
