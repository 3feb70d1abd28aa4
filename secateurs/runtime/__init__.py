"""Sparse inference on CPU: pruned weights kept compressed in memory and multiplied with directly."""

from secateurs.runtime.kernels import (
    PackedWeight,
    from_parts,
    isa,
    native_available,
    pack,
    set_isa,
    set_num_threads,
    spmm,
    unpack,
)

# SparseLinear, sparsify, load_sparse (secateurs/runtime/linear.py) are re-exported here once that module exists.

__all__ = [
    "PackedWeight",
    "from_parts",
    "isa",
    "native_available",
    "pack",
    "set_isa",
    "set_num_threads",
    "spmm",
    "unpack",
]
