"""What a one-shot run returns: per linear and per layer results, the masks (packed), and the run's report."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import torch

from secateurs.format.bits import pack_mask, unpack_mask
from secateurs.measure import versions


@dataclass
class PackedMask:
    """A pruning mask (True = pruned) stored 1 bit per weight: ``bits`` uint8 [rows, ceil(cols / 8)], LSB first."""

    bits: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def pack(cls, mask: torch.Tensor) -> PackedMask:
        return cls(pack_mask(mask.detach().to("cpu", torch.bool)), tuple(mask.shape))

    def unpack(self) -> torch.Tensor:
        return unpack_mask(self.bits, self.shape[1])

    def digest(self) -> str:
        """A short hash of the mask: equal masks have equal digests."""
        return hashlib.sha256(self.bits.contiguous().numpy().tobytes()).hexdigest()[:16]


@dataclass
class LinearResult:
    name: str
    shape: tuple[int, int]
    sparsity_target: float
    pruned: int  # weights the stages chose to zero
    zeros: int  # weights that are zero afterwards (pruned, plus any that were zero already)
    numel: int
    mask_sha256: str  # digest of the final mask (:meth:`PackedMask.digest`)
    info: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel


@dataclass
class LayerResult:
    index: int
    name: str
    sparsity_target: float
    output_error: float | None  # ||Y_sparse - Y_dense||^2 / ||Y_dense||^2 on the calibration inputs
    seconds: float
    linears: list[LinearResult]


@dataclass
class PruneReport:
    """What a pruning run did: recipe, protocol, achieved sparsity per linear, time and memory; and the masks.

    ``masks`` (full linear name -> :class:`PackedMask`) is not part of :meth:`to_dict`: it is saved beside the model
    (``masks.safetensors``) and is where sparse training starts from.
    """

    recipe: dict
    calibration: dict | None
    device: str
    prune_seconds: float
    rss_before_bytes: int  # resident memory when pruning started (the model is already loaded)
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    layers: list[dict]
    versions: dict = field(default_factory=versions)
    allocation_search: dict | None = None  # OWL auto: the candidates tried and the one chosen
    masks: dict[str, PackedMask] = field(default_factory=dict, repr=False)

    @property
    def linears(self) -> list[dict]:
        return [lin for layer in self.layers for lin in layer["linears"]]

    @property
    def pruned_weights(self) -> int:
        return sum(lin["zeros"] for lin in self.linears)

    @property
    def prunable_weights(self) -> int:
        return sum(lin["numel"] for lin in self.linears)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned linears."""
        total = self.prunable_weights
        return self.pruned_weights / total if total else 0.0

    def mask_tensors(self) -> dict[str, torch.Tensor]:
        """The masks unpacked: full linear name -> bool [rows, cols], True = pruned."""
        return {name: packed.unpack() for name, packed in self.masks.items()}

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("masks")
        data["sparsity"] = self.sparsity
        data["pruned_weights"] = self.pruned_weights
        data["prunable_weights"] = self.prunable_weights
        return data
