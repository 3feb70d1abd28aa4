"""Sparse inference on CPU: pruned weights kept compressed in memory and multiplied with directly."""

from secateurs.runtime.activation import sparsify_activations
from secateurs.runtime.decode import LeanDecoder
from secateurs.runtime.kernels import (
    PackedWeight,
    from_parts,
    isa,
    native_available,
    pack,
    pack_full,
    set_isa,
    set_num_threads,
    spmm,
    to_layout,
    unpack,
)
from secateurs.runtime.linear import (  # noqa: F401 (public names)
    SparseLinear,
    kernel_head,
    load_sparse,
    sparsify,
    to_sparse_linears,
    use_int8_activations,
)

__all__ = [
    "LeanDecoder",
    "PackedWeight",
    "from_parts",
    "isa",
    "native_available",
    "pack",
    "pack_full",
    "set_isa",
    "set_num_threads",
    "spmm",
    "to_layout",
    "unpack",
    "sparsify_activations",
    "use_int8_activations",
]
