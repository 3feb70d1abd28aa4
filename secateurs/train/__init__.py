"""Sparse training for any PyTorch model: masks kept through training, updated on the papers' schedules.

``SparseTraining(model, optimizer, method=RigL(), sparsity=0.9, distribution="erk", total_steps=N)``, then
``optimizer.step(); sparse.step()`` in the loop. Methods by name: :data:`secateurs.train.registry.METHODS`.
"""

from secateurs.train.method import Method
from secateurs.train.methods.gmp import GMP
from secateurs.train.methods.kernel import KernelRigL
from secateurs.train.methods.rest import REST
from secateurs.train.methods.rigl import RigL
from secateurs.train.methods.set import SET
from secateurs.train.methods.srste import SRSTE
from secateurs.train.methods.static import Static
from secateurs.train.registry import METHODS, method_from
from secateurs.train.sparse import SparseTraining, find_targets, layer_densities

__all__ = [
    "GMP",
    "METHODS",
    "REST",
    "SET",
    "SRSTE",
    "KernelRigL",
    "Method",
    "RigL",
    "SparseTraining",
    "Static",
    "find_targets",
    "layer_densities",
    "method_from",
]
