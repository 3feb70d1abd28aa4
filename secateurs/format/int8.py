"""int8 codes for the stored weights of a pruned linear, chosen with the layer's inputs in view (GPTQ rounding).

Round-to-nearest (:func:`secateurs.format.bits.quantize_rows`) rounds every stored weight on its own. GPTQ
(Frantar et al., arXiv 2210.17323; the joint sparse + quantised mode of SparseGPT, arXiv 2301.00774, with the mask
held fixed) rounds the columns of W one after the other and spreads each column's rounding error over the columns
not yet rounded, through the inverse Hessian H⁻¹ of the layer-wise loss ‖(W − Q) X‖² (H = X Xᵀ over calibration
tokens): for column j, with d = (H⁻¹)_jj after the earlier columns are eliminated (the upper Cholesky factor of
H⁻¹ holds these),

    e = (w_j − q_j) / d,    w_k −= e · (H⁻¹)_jk  for k > j.

The target is the pruned weight as it is: pruned entries are rounded to exactly 0 (their error is 0 until earlier
columns' errors reach them, and is then spread like any other), stored ones to a code of the row's fixed scale
(max |W_o,:| / 127, as round-to-nearest; a stored weight never gets the code 0, so the mask and every count stay).
Codes are clamped to ±127. The result is the same data as ``quantize_rows``: int8 codes and one float32 scale per
row. Columns are processed in blocks (the "lazy batch" update of the GPTQ paper), which gives the same result as
one column at a time up to fp32 rounding.

Differences from the reference code (github.com/IST-DASLab/gptq): symmetric per-row scales fixed before the pass
(the kernel's format), no activation reordering, dead inputs (H_jj = 0) get H_jj = 1 and their weights are rounded
without error spreading, dampening λ = ``damp`` · mean(diag H) as there.
"""

from __future__ import annotations

import torch

from secateurs.errors import SecateursError


def _round(w: torch.Tensor, stored: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes (as floats) of the column(s) ``w`` [rows, k]: round-to-nearest at ``scales`` [rows], clamped to ±127;
    a stored entry that would round to 0 gets ±1 of its sign, an entry not stored gets 0."""
    q = torch.round(w / scales[:, None]).clamp_(-127, 127)
    sign = torch.where(torch.signbit(w), -1.0, 1.0)
    q = torch.where(stored & (q == 0), sign, q)
    return torch.where(stored, q, torch.zeros_like(q))


def row_scales(weight: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """max |W[o, stored]| / 127 per row (1 for a row with nothing stored), as round-to-nearest uses."""
    w = weight.detach().float()
    amax = torch.where(stored, w.abs(), torch.zeros_like(w)).amax(dim=1) if w.shape[1] else torch.zeros(w.shape[0])
    return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).contiguous()


def _inverse_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of (H + λI)⁻¹ in fp32, dead inputs), with dead inputs given H_jj = 1."""
    H = H.detach().double().clone()
    dead = torch.diagonal(H) <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = 1
    diag = torch.diagonal(H)
    H += damp * diag.mean() * torch.eye(H.shape[0], dtype=H.dtype)
    for attempt in range(6):
        try:
            L = torch.linalg.cholesky(H)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float(), dead
        except torch.linalg.LinAlgError:  # not positive definite in floating point: dampen more
            H += (10.0**attempt) * damp * diag.mean() * torch.eye(H.shape[0], dtype=H.dtype)
    raise SecateursError("GPTQ rounding: the inputs' Gram matrix is not positive definite even when dampened")


def gptq_codes(
    weight: torch.Tensor,
    stored: torch.Tensor,
    H_sum: torch.Tensor,
    *,
    damp: float = 0.01,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [out, in], scales float32 [out]) of ``weight`` [out, in] whose ``stored`` entries are kept, by
    GPTQ rounding against ``H_sum`` = Σ x xᵀ [in, in] of the linear's inputs; see the module doc."""
    if weight.dim() != 2 or stored.shape != weight.shape or H_sum.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"shapes: weight {tuple(weight.shape)}, stored {tuple(stored.shape)}, H {tuple(H_sum.shape)}")
    if damp <= 0 or block < 1:
        raise ValueError("damp must be > 0 and block >= 1")
    W = weight.detach().float().clone()
    stored = stored.to(W.device)
    scales = row_scales(W, stored)
    U, dead = _inverse_factor(H_sum.to(W.device), damp)
    cols = W.shape[1]
    Q = torch.zeros_like(W)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        Wb = W[:, start:end].clone()
        Ub = U[start:end, start:end]
        Eb = torch.zeros_like(Wb)
        for i in range(end - start):
            w = Wb[:, i]
            q = _round(w[:, None], stored[:, start + i : start + i + 1], scales)[:, 0]
            Q[:, start + i] = q
            if dead[start + i]:
                continue  # an input that never fires: its rounding costs nothing, nothing to spread
            err = (w - q * scales) / Ub[i, i]
            Wb[:, i + 1 :] -= err[:, None] * Ub[i, i + 1 :][None, :]
            Eb[:, i] = err
        W[:, end:] -= Eb @ U[start:end, end:]
    return Q.to(torch.int8), scales


def reconstruction_error(weight: torch.Tensor, dequantised: torch.Tensor, H_sum: torch.Tensor) -> float:
    """‖(W − Ŵ) X‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ), the layer-wise loss GPTQ lowers."""
    D = (weight.double() - dequantised.double()).to(H_sum.device)
    return float(torch.einsum("oi,ij,oj->", D, H_sum.double(), D))
