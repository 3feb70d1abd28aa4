"""Every sparse-training method by name: one plain dict, the one place the list lives."""

from __future__ import annotations

from secateurs.errors import SecateursError
from secateurs.train.method import Method
from secateurs.train.methods.gmp import GMP
from secateurs.train.methods.kernel import KernelRigL
from secateurs.train.methods.rest import REST
from secateurs.train.methods.rigl import RigL
from secateurs.train.methods.set import SET
from secateurs.train.methods.srste import SRSTE
from secateurs.train.methods.static import Static

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Static, GMP, SET, RigL, SRSTE, KernelRigL, REST)}


def method_from(spec) -> Method:
    """A method from a config object, a name, or ``{"name": ..., **settings}``."""
    if isinstance(spec, Method):
        return spec
    if spec is None:
        return Static()
    options = {}
    if isinstance(spec, dict):
        options = dict(spec)
        spec = options.pop("name", None)
    if not isinstance(spec, str) or spec not in METHODS:
        raise SecateursError(f"unknown training method {spec!r}: choose one of {', '.join(METHODS)}")
    return METHODS[spec].from_options(options)
