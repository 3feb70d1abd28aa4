"""Sparse deltas and model merging for models fine-tuned from one base.

- :mod:`~secateurs.merge.delta`: DARE / DAREx-q drop-and-rescale of a delta, saved in the compact sparse format;
- :mod:`~secateurs.merge.methods`: averaging, task arithmetic, TIES, DARE + either, as pure functions;
- :mod:`~secateurs.merge.adamerging`: merge coefficients learned on unlabelled inputs, for any ``nn.Module``;
- :mod:`~secateurs.merge.folders`: the same on Hugging Face folders (``secateurs delta`` / ``secateurs merge``).
"""

from secateurs.merge.adamerging import AdaMerging, AdaMergingResult, adamerge, merged_tensors
from secateurs.merge.delta import (
    DARE,
    SparseDelta,
    choose_q,
    dare,
    drop,
    is_delta_folder,
    keep_mask,
    load_delta,
    make_delta,
    output_change,
    q_grid,
    save_delta,
)
from secateurs.merge.folders import apply_folder, delta_folder, merge_folder
from secateurs.merge.functional import entropy, forward
from secateurs.merge.methods import (
    METHODS,
    TIES,
    Average,
    TaskArithmetic,
    average,
    build_method,
    disjoint_mean,
    elect,
    merge,
    task_arithmetic,
    ties,
    trim,
)
from secateurs.merge.tensors import add, check_match, float_tensors, load_into, task_vector

__all__ = [
    "DARE",
    "METHODS",
    "TIES",
    "AdaMerging",
    "AdaMergingResult",
    "Average",
    "SparseDelta",
    "TaskArithmetic",
    "adamerge",
    "add",
    "apply_folder",
    "average",
    "build_method",
    "check_match",
    "choose_q",
    "dare",
    "delta_folder",
    "disjoint_mean",
    "drop",
    "elect",
    "entropy",
    "float_tensors",
    "forward",
    "is_delta_folder",
    "keep_mask",
    "load_delta",
    "load_into",
    "make_delta",
    "merge",
    "merge_folder",
    "merged_tensors",
    "output_change",
    "q_grid",
    "save_delta",
    "task_arithmetic",
    "task_vector",
    "ties",
    "trim",
]
