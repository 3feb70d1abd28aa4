"""SparseGPT (Frantar & Alistarh, 2023): prune column by column and let the remaining weights of each row
absorb the error through the inverse Hessian (optimal brain surgeon updates).

H = (2/n) sum x x^T over calibration tokens (``H_sum`` is sum x x^T, ``nsamples`` is n). Columns go in blocks
of ``blocksize``; the unstructured mask is picked once per block from w^2 / U_cc^2 over the whole block, the
N:M mask every M columns from the already-updated weights; later columns get lazy batched updates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from secateurs.oneshot.select import NM, check_nm_width
from secateurs.oneshot.stage import GRAM, Pruner, StageOutput, Target, Update, option

log = logging.getLogger(__name__)


@dataclass
class SparseGPTInfo:
    damping: float  # the relative damping that finally worked (fraction of mean diag H)
    retries: int  # how many times the damping had to be raised for Cholesky to succeed
    dead_inputs: int  # inputs that never fired (diag H == 0): weight zeroed


def hessian(H_sum: torch.Tensor, nsamples: int) -> torch.Tensor:
    return H_sum.float() * (2.0 / nsamples)


def inverse_hessian_factor(H: torch.Tensor, percdamp: float, max_retries: int = 6) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor U of (H + damp I)^-1, raising the damping tenfold until Cholesky succeeds."""
    mean_diag = torch.mean(torch.diag(H)).item()
    idx = torch.arange(H.shape[0], device=H.device)
    damp = percdamp
    for attempt in range(max_retries + 1):
        # each [cols, cols] intermediate is dropped as soon as the next exists (3 of them at most beside H, not 5:
        # 127 MB each for a 5632-wide input)
        Hd = H.clone()
        Hd[idx, idx] += damp * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info.item() == 0:
                return U, damp, attempt
        damp *= 10.0
    raise torch.linalg.LinAlgError(f"Hessian not positive definite even with damping {damp / 10:g} x mean(diag H)")


def sparsegpt_prune(
    W: torch.Tensor,
    H_sum: torch.Tensor,
    nsamples: int,
    sparsity: float | None = None,
    nm: NM | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    fixed_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, SparseGPTInfo]:
    """Return (new weight in W's dtype, pruned mask, info). W is [rows, cols]; H_sum is [cols, cols].

    With ``fixed_mask`` (bool [rows, cols], True = pruned) no mask is chosen: the same column-by-column OBS updates
    reconstruct the kept weights of that mask (dead inputs are still zeroed).
    """
    rows, cols = W.shape
    if fixed_mask is not None:
        nm = None
    if nm is not None:
        check_nm_width(cols, nm)
        if blocksize % nm.m:
            blocksize = nm.m * max(1, blocksize // nm.m)
    with fp32_matmul():
        W_out = W.detach().float().contiguous().clone()
        H = hessian(H_sum, nsamples).to(W_out.device)
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W_out[:, dead] = 0.0
        U, damp, retries = inverse_hessian_factor(H, percdamp)
        del H
        if retries:
            log.warning("SparseGPT: Cholesky failed, damping raised to %g x mean(diag H)", damp)

        mask = torch.zeros(rows, cols, dtype=torch.bool, device=W_out.device)
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1 = W_out[:, i1:i2].clone()
            U1 = U[i1:i2, i1:i2]
            d = torch.diag(U1)
            Err1 = torch.zeros_like(W1)
            mask1 = torch.zeros(W1.shape, dtype=torch.bool, device=W1.device)
            if fixed_mask is not None:
                mask1 = fixed_mask[:, i1:i2].to(W1.device).clone()
            elif nm is None:
                # this block's share of floor(rows * cols * sparsity), by cumulative rounding: exact in total
                k = int(rows * i2 * sparsity) - int(rows * i1 * sparsity)
                scores = (W1**2 / d.reshape(1, -1) ** 2).reshape(-1)
                if k > 0:
                    order = torch.argsort(scores, stable=True)
                    mask1.view(-1)[order[:k]] = True
            for i in range(i2 - i1):
                if nm is not None and i % nm.m == 0:
                    group = W1[:, i : i + nm.m] ** 2 / d[i : i + nm.m].reshape(1, -1) ** 2
                    order = torch.argsort(group, dim=1, stable=True)
                    mask1[:, i : i + nm.m].scatter_(1, order[:, : nm.n], True)
                w = W1[:, i]
                q = torch.where(mask1[:, i], torch.zeros_like(w), w)
                err = (w - q) / U1[i, i]
                W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
                W1[:, i] = q
                Err1[:, i] = err
            W_out[:, i1:i2] = W1
            W_out[:, i2:] -= Err1 @ U[i1:i2, i2:]
            mask[:, i1:i2] = mask1
        W_out[mask] = 0.0
    info = SparseGPTInfo(damping=damp, retries=retries, dead_inputs=int(dead.sum().item()))
    return W_out.to(W.dtype), mask, info


class fp32_matmul:
    """Turn TF32 off on CUDA for the duration (SparseGPT needs full fp32 precision)."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


@dataclass(frozen=True)
class OBSSettings:
    """The settings SparseGPT's pruner and its fixed-mask update share."""

    blocksize: int = option(128, "column block of the lazy batched updates (the unstructured mask: once per block)")
    percdamp: float = option(0.01, "damping added to diag H, as a fraction of its mean")

    def __post_init__(self) -> None:
        self.check(self.blocksize >= 1, f"blocksize must be positive, got {self.blocksize}")
        self.check(self.percdamp > 0, f"percdamp must be positive, got {self.percdamp}")


@dataclass(frozen=True)
class SparseGPT(OBSSettings, Pruner):
    name: ClassVar[str] = "sparsegpt"
    summary: ClassVar[str] = "column by column, the kept weights absorb the error through the inverse Hessian"
    needs: ClassVar[frozenset[str]] = frozenset({GRAM})
    flag_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"blocksize": ("--blocksize",), "percdamp": ("--percdamp",)}

    def prune(self, W: torch.Tensor, stats, target: Target) -> StageOutput:
        new_W, mask, details = sparsegpt_prune(
            W, stats.H_sum, stats.nsamples, target.sparsity, target.nm, self.blocksize, self.percdamp
        )
        return StageOutput(new_W, mask, _info(details))

    def score(self, W: torch.Tensor, stats) -> torch.Tensor:
        """w^2 / U_jj^2 over the whole dense matrix, U the upper Cholesky factor of (H + damp)^-1: the saliency
        SparseGPT ranks by, computed once without its column-by-column updates (as DSnoT's reference does)."""
        return sparsegpt_scores(W, stats.H_sum, stats.nsamples, self.percdamp)

    def reconstruct(self, W_dense, W, mask, stats, target: Target) -> StageOutput:
        return SparseGPTUpdate(self.blocksize, self.percdamp).update(W_dense, W, mask, stats, target)


def sparsegpt_scores(W: torch.Tensor, H_sum: torch.Tensor, nsamples: int, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT's saliency w_ij^2 / [U_jj]^2 of every weight of W, from one factorisation (inputs that never fired:
    weight treated as zero)."""
    with fp32_matmul():
        H = hessian(H_sum.to(W.device), nsamples)
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        Wf = W.detach().float().clone()
        Wf[:, dead] = 0
        U, _, _ = inverse_hessian_factor(H, percdamp)
        return Wf**2 / torch.diag(U).reshape(1, -1) ** 2


@dataclass(frozen=True)
class SparseGPTUpdate(OBSSettings, Update):
    """SparseGPT's OBS updates on a mask chosen by another pruner (e.g. Wanda's mask, SparseGPT's weights)."""

    name: ClassVar[str] = "sparsegpt"
    summary: ClassVar[str] = "SparseGPT's column-by-column OBS reconstruction of the kept weights"
    needs: ClassVar[frozenset[str]] = frozenset({GRAM})

    def update(self, W_dense, W, mask, stats, target: Target) -> StageOutput:
        new_W, _, details = sparsegpt_prune(
            W_dense, stats.H_sum, stats.nsamples, blocksize=self.blocksize, percdamp=self.percdamp, fixed_mask=mask
        )
        return StageOutput(new_W.to(W.dtype), mask, _info(details))


def _info(details: SparseGPTInfo) -> dict:
    return {"damping": details.damping, "damping_retries": details.retries, "dead_inputs": details.dead_inputs}
