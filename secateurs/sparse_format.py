"""Old home of the sparse checkpoint code, kept so existing imports still work; it only re-exports.

The file format is :mod:`secateurs.format.sparse`; saving, loading and ``secateurs compress`` are
:mod:`secateurs.checkpoint`.
"""

from secateurs.checkpoint import add_parser, compress, load_pruned, save_sparse
from secateurs.format.bits import break_even_sparsity, packed_bytes, stored_count
from secateurs.format.sparse import FORMAT, FORMAT_VERSION, PACKABLE_DTYPES, WEIGHTS_NAME
from secateurs.loading import check_loaded, is_sparse_folder, load_tokenizer, read_sparse
from secateurs.models import decoder_linears

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PACKABLE_DTYPES",
    "WEIGHTS_NAME",
    "add_parser",
    "break_even_sparsity",
    "check_loaded",
    "compress",
    "decoder_linears",
    "is_sparse_folder",
    "load_pruned",
    "load_tokenizer",
    "packed_bytes",
    "read_sparse",
    "save_sparse",
    "stored_count",
]
