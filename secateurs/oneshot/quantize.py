"""int8 codes for every decoder linear of a (pruned) causal LM, by GPTQ rounding on calibration text.

One pass through the model as it is, decoder layer by decoder layer (:func:`secateurs.oneshot.walk.dense_walk`),
summing each linear's x xᵀ; then :func:`secateurs.format.int8.gptq_codes` per linear. The codes go to
:func:`secateurs.checkpoint.save_sparse` (``int8_codes``), which stores them in place of round-to-nearest ones:
same format, same kernel, a lower layer-wise reconstruction error. The model itself is not changed.
"""

from __future__ import annotations

import torch
from torch import nn

from secateurs.format.bits import stored_bits
from secateurs.format.int8 import gptq_codes
from secateurs.models import find_layers
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
