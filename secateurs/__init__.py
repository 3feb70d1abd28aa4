"""secateurs: prune Hugging Face causal language models and measure what it cost."""

from secateurs.api import evaluate, prune
from secateurs.errors import SecateursError
from secateurs.models import find_layers, find_linears, load_model
from secateurs.patterns import NM, parse_nm
from secateurs.recipe import Calibration, Recipe
from secateurs.report import PruneReport

__all__ = [
    "NM",
    "Calibration",
    "PruneReport",
    "Recipe",
    "SecateursError",
    "evaluate",
    "find_layers",
    "find_linears",
    "load_model",
    "parse_nm",
    "prune",
]
__version__ = "0.1.0"
