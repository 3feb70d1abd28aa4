"""secateurs: prune Hugging Face causal language models and measure what it cost."""

from secateurs.api import evaluate, prune
from secateurs.errors import SecateursError
from secateurs.evaluate.zeroshot import zero_shot
from secateurs.models import find_layers, find_linears, load_model
from secateurs.patterns import NM, parse_nm
from secateurs.recipe import Calibration, Recipe
from secateurs.report import PruneReport
from secateurs.runtime.linear import SparseLinear, load_sparse, sparsify
from secateurs.sparse_format import compress, load_pruned, save_sparse

__all__ = [
    "NM",
    "Calibration",
    "PruneReport",
    "Recipe",
    "SecateursError",
    "SparseLinear",
    "compress",
    "evaluate",
    "find_layers",
    "find_linears",
    "load_model",
    "load_pruned",
    "load_sparse",
    "parse_nm",
    "prune",
    "save_sparse",
    "sparsify",
    "zero_shot",
]
__version__ = "0.1.0"
