"""ADMM weight update for a fixed mask, and ADMM with gradual mask selection (Boža, 2024, "Fast and Effective Weight
Update for Pruned Large Language Models", arXiv 2401.02938; reference code github.com/fmfi-compbio/admm-pruning,
``lib/admm.py``, ``AdmmPruner.fasterprune``, called from ``lib/prune.py``, ``prune_admm``).

The layer-wise problem: with H = sum x x^T over the calibration tokens and W0 the dense weight [rows, cols],

    minimise  tr((W - W0) H (W - W0)^T) = ||X W^T - X W0^T||^2   subject to  W = 0 on the mask.

Split W into a free copy W and a copy Z constrained to the mask, and run ADMM on ``f(W) + [Z on the mask]`` with the
constraint W = Z (scaled dual U), as ``fasterprune`` does:

1. **Normalise** (``fasterprune``: ``norm = diag(XX).sqrt()``): d_j = sqrt(H_jj), Hn = D^-1 H D^-1 (unit diagonal,
   a correlation matrix) and W0n = W0 D, so a weight's magnitude in this space is its Wanda score |W_ij| ||x_j||
   and one penalty suits every layer. The problem is the same one; results go back through W = Wn D^-1. Inputs that
   never fired (H_jj = 0) get d_j = 1 (the reference adds 1e-8 to every d_j instead), are decoupled from the rest
   and keep their dense weight where the mask keeps them (the objective does not see them).
2. **Damp** (``rho0 = percdamp * diag(XX).mean()``, with ``percdamp=0.1`` passed by ``prune_admm``): add
   lambda = percdamp * mean(diag Hn) to the diagonal of Hn *before* forming Hn W0n, so the problem solved is the one
   with Hn + lambda I, i.e. H + lambda diag(H) in the original space: a ridge that pulls every kept weight towards
   its dense value. ``percdamp=0`` solves the undamped problem.
3. **Factorise once** (``XXinv = torch.inverse(XX + rho I)``): with rho = 1 (``rho = 1`` in ``fasterprune``: one
   constant penalty, no schedule), B = W0n (Hn + lambda I) and A^-1 = (Hn + lambda I + rho I)^-1 (here by Cholesky
   and ``cholesky_inverse``: A is symmetric with eigenvalues >= lambda + rho, so this never fails).
4. **Iterate** ``iters`` = 20 times (``iters=20`` default of ``fasterprune``), from W = W0n and U = 0, in the
   reference's order:  Z = W + U with the mask's entries set to 0 (projection onto the mask);  U += W - Z;
   W = (B + rho (Z - U)) A^-1.
5. **Return Z** = the projection of the last W + U (the reference's final step; no extra solve on the support),
   mapped back by D^-1 and cast to the input dtype: exact zeros (+0.0) on the mask by construction.

``info``: iterations, the absolute damping lambda, the number of dead inputs, and the final primal residual
||W - Z|| / ||Z|| (normalised space), which says how far the 20 iterations are from a fixed point.

With many iterations this converges to the exact least-squares solution on the kept support (the problem is convex:
a quadratic on a linear subspace, for any rho > 0); 20 iterations are the reference's trade-off.

:class:`ADMMGradual` is the paper's "ADMM with gradual pruning" (``fasterprune`` with ``iterative_prune=15``, its
default, so the reference's ``--prune_method admm`` is this variant): the same iterations, but during the first
``gradual_iters`` = 15 of them the mask is chosen again from |W + U| (the current iterate's Wanda-like score, in the
normalised space) at the cubic sparsity schedule s_t = s - s (1 - t / gradual_iters)^3, t = 1 .. gradual_iters,
reaching the target s at iteration ``gradual_iters``; the remaining iterations keep that final mask. As in the
reference, the unstructured count is per matrix by default (``per_out=False``: the floor(rows * cols * s_t) lowest
scores of the whole matrix; ``group="row"`` is the reference's ``per_out=True``, floor(cols * s_t) per row); for N:M
the N lowest of every M-group are the candidates, the floor(rows * cols * s_t) lowest candidates of the matrix are
pruned, and the last gradual step prunes exactly N of every M (the reference hard-codes 2:4; this is the same rule
for any N:M). ``gradual_iters=0`` picks the mask once from |W0n| before the iterations (the reference's
``iterative_prune=0`` branch).

Differences from the reference: the reference's unstructured per-matrix branch computes s_t but selects the *full*
target sparsity at every gradual iteration (``k=int(W.numel() * sparsity)``); here every branch follows the cubic
schedule, as the paper describes and the reference's per-row and N:M branches do (on random correlated problems it
gives a slightly lower error than the full-sparsity reselection). The inverse is formed from a Cholesky factor rather
than ``torch.inverse``; dead inputs are handled as described in step 1; ties in the mask selection go to the earlier
position, as everywhere in :mod:`secateurs.oneshot.select`. The work is done in the weight's [rows, cols] layout (the
reference transposes), in fp32 with TF32 off on CUDA, on the device of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateurs.oneshot.pruners.sparsegpt import fp32_matmul
from secateurs.oneshot.select import NM, check_nm_width, n_of_m
from secateurs.oneshot.stage import GRAM, Pruner, StageOutput, Target, Update, option

GROUPS = ("matrix", "row")


class _Problem:
    """The normalised, damped problem of one linear and the factorised W-step of its ADMM."""

    def __init__(self, W_dense: torch.Tensor, H_sum: torch.Tensor, rho: float, percdamp: float):
        W0 = W_dense.detach().float()
        H = H_sum.detach().to(device=W0.device, dtype=torch.float32)
        diag = torch.diagonal(H)
        self.dead = diag <= 0
        self.norm = torch.where(self.dead, torch.ones_like(diag), diag.clamp_min(0).sqrt())
        Hn = H / self.norm.reshape(-1, 1) / self.norm.reshape(1, -1)
        Hn[self.dead, :] = 0.0
        Hn[:, self.dead] = 0.0
        self.damping = percdamp * torch.diagonal(Hn).mean().item()
        torch.diagonal(Hn).add_(self.damping)
        self.W0n = W0 * self.norm.reshape(1, -1)
        self.B = self.W0n @ Hn  # (Hn + lambda I) is symmetric: B = W0n (Hn + lambda I), [rows, cols]
        torch.diagonal(Hn).add_(rho)
        L, info = torch.linalg.cholesky_ex(Hn)
        if info.item() != 0:  # only for non-finite statistics: A's eigenvalues are >= lambda + rho > 0
            raise torch.linalg.LinAlgError("ADMM: H + (damping + rho) I is not positive definite (non-finite H?)")
        del Hn
        self.Ainv = torch.cholesky_inverse(L)
        self.rho = rho

    def w_step(self, Z: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        return (self.B + self.rho * (Z - U)) @ self.Ainv

    def weight(self, Zn: torch.Tensor) -> torch.Tensor:
        return Zn / self.norm.reshape(1, -1)


def admm_update(
    W_dense: torch.Tensor,
    H_sum: torch.Tensor,
    mask: torch.Tensor,
    iters: int = 20,
    rho: float = 1.0,
    percdamp: float = 0.1,
) -> tuple[torch.Tensor, dict]:
    """Kept weights of the fixed ``mask`` (bool, True = pruned) that minimise ||X (W - W_dense)^T||^2, by ADMM.

    Returns (weight in fp32 with exact zeros on the mask, info). ``H_sum`` is sum x x^T [cols, cols].
    """
    with torch.no_grad(), fp32_matmul():
        problem = _Problem(W_dense, H_sum, rho, percdamp)
        mask = mask.to(problem.W0n.device)
        W = problem.W0n.clone()
        U = torch.zeros_like(W)
        for _ in range(iters):
            Z = (W + U).masked_fill_(mask, 0.0)  # projection onto the mask (+0.0, never -0.0)
            U += W - Z
            W = problem.w_step(Z, U)
        Z = (W + U).masked_fill_(mask, 0.0)
        residual = (torch.linalg.vector_norm(W - Z) / torch.linalg.vector_norm(Z).clamp_min(1e-30)).item()
        out = problem.weight(Z)
    return out, _info(problem, iters, residual)


def _cubic(sparsity: float, step: int, steps: int) -> float:
    """Sparsity after gradual step ``step`` of ``steps`` (1-based): s - s (1 - step / steps)^3, exactly s at the end."""
    return sparsity if step >= steps else sparsity - sparsity * (1.0 - step / steps) ** 3


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest entries along the last dimension, earlier position first among equals.

    The same mask as :mod:`secateurs.oneshot.select`'s stable sort, by one selection (``kthvalue``) instead of a sort:
    the gradual mask is chosen again at every gradual iteration.
    """
    n = scores.shape[-1]
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    below = scores < threshold
    tied = scores == threshold
    wanted = k - below.sum(-1, keepdim=True)
    if bool((tied.sum(-1, keepdim=True) <= wanted).all()):  # the usual case: no tie straddles the k-th place
        return below | tied
    return below | (tied & (torch.cumsum(tied, dim=-1) <= wanted))


def _select(scores: torch.Tensor, target: Target, sparsity: float, final: bool, group: str) -> torch.Tensor:
    """Pruned mask from scores (lower = pruned first) at the intermediate ``sparsity`` (the target's when ``final``).

    Counts as in :mod:`secateurs.oneshot.select`: floor(rows * cols * sparsity) per matrix, floor(cols * sparsity)
    per row; for N:M, at the last step exactly N of every M (``n_of_m``).
    """
    rows, cols = scores.shape
    if target.nm is not None:
        candidates = n_of_m(scores, target.nm)  # the N lowest of every M-group
        if final:
            return candidates
        masked = torch.where(candidates, scores, torch.full_like(scores, float("inf")))
        return _lowest(masked.reshape(-1), int(rows * cols * sparsity)).reshape(rows, cols)
    if group == "row":
        return _lowest(scores, int(cols * sparsity))
    return _lowest(scores.reshape(-1), int(rows * cols * sparsity)).reshape(rows, cols)


def admm_gradual_prune(
    W: torch.Tensor,
    H_sum: torch.Tensor,
    sparsity: float,
    nm: NM | None = None,
    iters: int = 20,
    gradual_iters: int = 15,
    rho: float = 1.0,
    percdamp: float = 0.1,
    group: str = "matrix",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune and update one linear by ADMM with a mask chosen gradually from the iterates (see the module docstring).

    Returns (weight in fp32 with exact zeros on the mask, pruned mask, info).
    """
    rows, cols = W.shape
    if nm is not None:
        check_nm_width(cols, nm)
        sparsity = nm.sparsity
    target = Target(sparsity, nm)
    with torch.no_grad(), fp32_matmul():
        problem = _Problem(W, H_sum, rho, percdamp)
        W = problem.W0n.clone()
        U = torch.zeros_like(W)
        if gradual_iters == 0:
            mask = _select(W.abs(), target, sparsity, True, group)
        for it in range(iters):
            if it < gradual_iters:
                final = it + 1 >= gradual_iters
                mask = _select((W + U).abs(), target, _cubic(sparsity, it + 1, gradual_iters), final, group)
            Z = (W + U).masked_fill_(mask, 0.0)
            U += W - Z
            W = problem.w_step(Z, U)
        Z = (W + U).masked_fill_(mask, 0.0)
        residual = (torch.linalg.vector_norm(W - Z) / torch.linalg.vector_norm(Z).clamp_min(1e-30)).item()
        out = problem.weight(Z)
    return out, mask, _info(problem, iters, residual)


def _info(problem: _Problem, iters: int, residual: float) -> dict:
    return {
        "iterations": iters,
        "damping": problem.damping,
        "dead_inputs": int(problem.dead.sum().item()),
        "primal_residual": residual,  # ||W - Z|| / ||Z|| at the end, in the normalised space
    }


@dataclass(frozen=True)
class ADMMSettings:
    """The settings the ADMM update and the gradual ADMM pruner share."""

    iters: int = option(20, "ADMM iterations")
    rho: float = option(1.0, "ADMM penalty, on the Hessian normalised to unit diagonal")
    percdamp: float = option(0.1, "ridge towards the dense weights: this fraction of mean diag(normalised H) is added")

    def __post_init__(self) -> None:
        self.check(self.iters >= 1, f"iters must be at least 1, got {self.iters}")
        self.check(self.rho > 0, f"rho must be positive, got {self.rho}")
        self.check(self.percdamp >= 0, f"percdamp must be non-negative, got {self.percdamp}")


@dataclass(frozen=True)
class ADMM(ADMMSettings, Update):
    """ADMM reconstruction of the kept weights of a mask chosen by another pruner (Boža, 2024)."""

    name: ClassVar[str] = "admm"
    summary: ClassVar[str] = "ADMM least-squares reconstruction of the kept weights (one factorisation of H)"
    needs: ClassVar[frozenset[str]] = frozenset({GRAM})

    def update(self, W_dense, W, mask, stats, target: Target) -> StageOutput:
        new_W, info = admm_update(W_dense, stats.H_sum, mask, self.iters, self.rho, self.percdamp)
        return StageOutput(new_W.to(W.dtype), mask, info)


@dataclass(frozen=True)
class ADMMGradual(ADMMSettings, Pruner):
    """ADMM whose mask rises to the target over the first iterations, chosen from the iterates (Boža, 2024)."""

    name: ClassVar[str] = "admm-gradual"
    summary: ClassVar[str] = "ADMM reconstruction with the mask chosen gradually (cubic schedule) from its iterates"
    needs: ClassVar[frozenset[str]] = frozenset({GRAM})

    gradual_iters: int = option(15, "iterations over which the sparsity rises to the target (0: mask chosen once)")
    group: str = option("matrix", "unstructured only: prune per matrix (one threshold, the reference's) or per row")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(
            0 <= self.gradual_iters <= self.iters,
            f"gradual_iters must be in [0, iters={self.iters}], got {self.gradual_iters}",
        )
        self.check(self.group in GROUPS, f"group must be one of {', '.join(GROUPS)}, got {self.group!r}")

    def prune(self, W: torch.Tensor, stats, target: Target) -> StageOutput:
        new_W, mask, info = admm_gradual_prune(
            W,
            stats.H_sum,
            target.sparsity,
            target.nm,
            self.iters,
            self.gradual_iters,
            self.rho,
            self.percdamp,
            self.group,
        )
        return StageOutput(new_W.to(W.dtype), mask, info)

    def reconstruct(self, W_dense, W, mask, stats, target: Target) -> StageOutput:
        return ADMM(iters=self.iters, rho=self.rho, percdamp=self.percdamp).update(W_dense, W, mask, stats, target)
