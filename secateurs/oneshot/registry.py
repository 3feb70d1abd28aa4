"""Every stage a recipe can name, by kind: a plain dict from name to config class. Adding a method is one line here."""

from __future__ import annotations

from secateurs.errors import SecateursError
from secateurs.oneshot.allocations.owl import OWL
from secateurs.oneshot.allocations.table import Table
from secateurs.oneshot.allocations.uniform import Uniform
from secateurs.oneshot.pruners.magnitude import Magnitude
from secateurs.oneshot.pruners.ria import RIA
from secateurs.oneshot.pruners.sparsegpt import SparseGPT, SparseGPTUpdate
from secateurs.oneshot.pruners.wanda import Wanda
from secateurs.oneshot.refiners.dsnot import DSnoT
from secateurs.oneshot.stage import Allocation, Pruner, Refiner, Stage, Update
from secateurs.oneshot.updates.admm import ADMM, ADMMGradual

PRUNERS: dict[str, type[Pruner]] = {c.name: c for c in (Magnitude, Wanda, SparseGPT, RIA, ADMMGradual)}
REFINERS: dict[str, type[Refiner]] = {c.name: c for c in (DSnoT,)}
UPDATES: dict[str, type[Update]] = {c.name: c for c in (SparseGPTUpdate, ADMM)}
ALLOCATIONS: dict[str, type[Allocation]] = {c.name: c for c in (Uniform, OWL, Table)}

KINDS: dict[str, dict[str, type[Stage]]] = {
    "pruner": PRUNERS,
    "refiner": REFINERS,
    "update": UPDATES,
    "allocation": ALLOCATIONS,
}
WORDS = {"pruner": "method", "refiner": "refinement", "update": "weight update", "allocation": "allocation"}


def stage_class(kind: str, name: str) -> type[Stage]:
    """The config class registered as ``name`` for ``kind``; one clear error listing the choices otherwise."""
    table = KINDS[kind]
    key = str(name).strip().lower()
    if key not in table:
        choices = ", ".join(n for n in table if n != "table") + (", or a .json file" if kind == "allocation" else "")
        raise SecateursError(f"unknown {WORDS[kind]} {name!r}: choose one of {choices}")
    return table[key]


def all_stages() -> list[type[Stage]]:
    return [cls for table in KINDS.values() for cls in table.values()]
