"""The sparse linear module itself (its loaders are in :mod:`secateurs.runtime.linear`)."""

from __future__ import annotations

import torch
from torch import nn

from secateurs.models import weight_view
from secateurs.runtime import kernels


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W [out, in]`` held as a :class:`~secateurs.runtime.kernels.PackedWeight`.

    Inference only (no gradients). ``transposed`` records that the layer it replaced was a GPT-2 style Conv1D
    (weight stored [in, out]), so the model can be saved again in the same layout.
    """

    def __init__(
        self,
        packed: kernels.PackedWeight,
        bias: torch.Tensor | None = None,
        transposed: bool = False,
        threshold: float | None = None,
    ):
        super().__init__()
        self.packed = packed
        self.threshold = threshold  # activation sparsity: inputs with |x| <= threshold count as zero
        self.out_features, self.in_features = packed.shape
        self.transposed = transposed
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match {self.out_features} outputs")
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # (group, index) when this linear shares its input with others and is multiplied with them in one call
        # (secateurs.runtime.fused); ``packed`` then views its rows of the group's weight
        self.shared = None
        # int8 values only: the input is quantised to int8 per group of 64 and multiplied by integer dot products
        # (secateurs.runtime.linear.int8_activations; kernels.spmm's int8_inputs)
        self.int8_inputs = False

    @classmethod
    def from_dense(cls, module: nn.Module, values: str | None = None, layout: str = "rows") -> SparseLinear:
        """Pack an nn.Linear (or Conv1D) as it is; the weight must be float32 or bfloat16 on the CPU.
        ``values="int8"`` stores int8 codes with per-row scales (then not bit-identical); ``layout`` see
        :func:`~secateurs.runtime.kernels.to_layout`."""
        W = weight_view(module).detach()
        bias = None if module.bias is None else module.bias.detach()
        packed = kernels.to_layout(kernels.pack(W.contiguous(), values), layout)
        return cls(packed, bias, transposed=not isinstance(module, nn.Linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            group, index = self.shared
            return group.forward(index, x)
        return kernels.spmm(x, self.packed, self.bias, self.threshold, self.int8_inputs)

    def dense_weight(self) -> torch.Tensor:
        """The weight as the replaced layer held it (bit-identical; int8 codes dequantised to float32): [out, in],
        or [in, out] for a Conv1D."""
        W = kernels.unpack(self.packed)
        return W.t().contiguous() if self.transposed else W

    @property
    def nbytes(self) -> int:
        """Bytes the layer keeps in memory for its weight (mask, values with padding, row offsets)."""
        p = self.packed
        scales = 0 if p.scales is None else p.scales.numel() * 4
        return p.mask.numel() + p.values.numel() * p.values.element_size() + p.row_offsets.numel() * 8 + scales

    def extra_repr(self) -> str:
        p = self.packed
        extra = "" if p.layout == "rows" else f", layout={p.layout}"
        if self.threshold is not None:
            extra += f", threshold={self.threshold:.4g}"
        if self.int8_inputs:
            extra += ", int8 inputs"
        if self.shared is not None:
            extra += f", shares its input with {len(self.shared[0].members) - 1} more (one call)"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"dtype={str(p.dtype).removeprefix('torch.')}, density={p.density:.3f}{extra}"
        )


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the submodule called ``name``."""
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, module)
