"""int8 codes for the pruned linears of a causal LM, chosen with their inputs in view (GPTQ rounding).

Round-to-nearest (`secateurs.format.bits.quantize_rows`) rounds every stored weight on its own. GPTQ
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

:func:`int8_codes` makes one pass through the model as it is, decoder layer by decoder layer
(:func:`secateurs.oneshot.walk.dense_walk`), summing each linear's x xᵀ, then calls :func:`gptq_codes` per linear;
:func:`secateurs.checkpoint.save_sparse` (``int8_codes``) stores the codes in place of round-to-nearest ones. The
model itself is not changed.
"""

from __future__ import annotations

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.format.bits import round_codes, row_scales, stored_bits
from secateurs.models import find_layers
from secateurs.oneshot.pruners.sparsegpt import inverse_hessian_factor
from secateurs.oneshot.stage import GRAM
from secateurs.oneshot.walk import dense_walk


@torch.no_grad()
def int8_codes(
    model: nn.Module,
    calibration: torch.Tensor,
    device: torch.device | str = "cpu",
    *,
    damp: float = 0.01,
    progress: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{decoder linear name: (codes int8 [out, in], scales float32 [out])} of ``model``'s decoder linears, chosen by
    GPTQ rounding against their inputs on the ``calibration`` windows [n, seqlen] (token ids)."""
    device = torch.device(device)
    codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def per_layer(index, weights, stats):
        for name, W in weights.items():
            H = stats[name].H_sum
            q, scales = gptq_codes(W.float().to(device), stored_bits(W).to(device), H.to(device), damp=damp)
            codes[f"{prefix}.{index}.{name}"] = (q.cpu(), scales.cpu())

    prefix = find_layers(model)[0]
    dense_walk(model, calibration, device, per_layer, wanted=frozenset({GRAM}), progress=progress)
    return codes


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
    H = H_sum.detach().to(W.device).double().clone()
    dead = torch.diagonal(H) <= 0  # an input that never fires: its rounding costs nothing, nothing to spread
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = 1
    try:
        U = inverse_hessian_factor(H, damp)[0].float()
    except torch.linalg.LinAlgError:
        raise SecateursError("GPTQ rounding: the inputs' Gram matrix is not positive definite, even dampened") from None
    cols = W.shape[1]
    Q = torch.zeros_like(W)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        Wb = W[:, start:end].clone()
        Ub = U[start:end, start:end]
        Eb = torch.zeros_like(Wb)
        for i in range(end - start):
            w = Wb[:, i]
            q = round_codes(w[:, None], stored[:, start + i : start + i + 1], scales)[:, 0]
            Q[:, start + i] = q
            if dead[start + i]:
                continue
            err = (w - q * scales) / Ub[i, i]
            Wb[:, i + 1 :] -= err[:, None] * Ub[i, i + 1 :][None, :]
            Eb[:, i] = err
        W[:, end:] -= Eb @ U[start:end, end:]
    return Q.to(torch.int8), scales


def reconstruction_error(weight: torch.Tensor, dequantised: torch.Tensor, H_sum: torch.Tensor) -> float:
    """‖(W − Ŵ) X‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ), the layer-wise loss GPTQ lowers."""
    D = (weight.double() - dequantised.double()).to(H_sum.device)
    return float(torch.einsum("oi,ij,oj->", D, H_sum.double(), D))
