"""secateurs: prune Hugging Face causal language models and measure what it cost."""

from secateurs.api import evaluate, evaluate_streamed, prune, zero_shot_streamed
from secateurs.checkpoint import compress, load_masks, load_pruned, save_sparse
from secateurs.data.calibration import Calibration
from secateurs.errors import SecateursError
from secateurs.evaluate.zeroshot import zero_shot
from secateurs.models import find_layers, find_linears, load_model
from secateurs.oneshot.allocations.owl import OWL
from secateurs.oneshot.allocations.table import Table
from secateurs.oneshot.allocations.uniform import Uniform
from secateurs.oneshot.pruners.magnitude import Magnitude
from secateurs.oneshot.pruners.ria import RIA
from secateurs.oneshot.pruners.sparsegpt import SparseGPT, SparseGPTUpdate
from secateurs.oneshot.pruners.wanda import Wanda
from secateurs.oneshot.recipe import Recipe
from secateurs.oneshot.refiners.dsnot import DSnoT
from secateurs.oneshot.result import PackedMask, PruneReport
from secateurs.oneshot.select import NM, parse_nm
from secateurs.oneshot.updates.admm import ADMM, ADMMGradual
from secateurs.runtime.activation import sparsify_activations
from secateurs.runtime.linear import (
    SparseLinear,
    kernel_head,
    load_sparse,
    sparsify,
    to_sparse_linears,
    use_int8_activations,
)

__all__ = [
    "ADMM",
    "ADMMGradual",
    "RIA",
    "DSnoT",
    "OWL",
    "Magnitude",
    "PackedMask",
    "SparseGPT",
    "SparseGPTUpdate",
    "Table",
    "Uniform",
    "Wanda",
    "NM",
    "Calibration",
    "PruneReport",
    "Recipe",
    "SecateursError",
    "SparseLinear",
    "compress",
    "evaluate",
    "evaluate_streamed",
    "find_layers",
    "find_linears",
    "load_masks",
    "load_model",
    "load_pruned",
    "kernel_head",
    "load_sparse",
    "parse_nm",
    "prune",
    "save_sparse",
    "sparsify",
    "sparsify_activations",
    "to_sparse_linears",
    "use_int8_activations",
    "zero_shot",
    "zero_shot_streamed",
]
__version__ = "0.1.0"
