"""What to do to a model: a chain of stages (allocation -> pruner -> refiner -> weight update) and its target.

A recipe round-trips through a plain dict, JSON and YAML (``to_dict`` / ``from_dict`` / ``save`` / ``load``); every
report holds ``recipe.to_dict()``, so what ran can be run again. The dict names each stage and holds its settings::

    {"method": "sparsegpt", "sparsity": 0.7, "pattern": null, "allocation": "owl", "refine": "dsnot",
     "update": null, "exclude": [], "unrouted_experts": "dense",
     "options": {"method": {"blocksize": 128, "percdamp": 0.01},
     "allocation": {"m": 5.0, "lam": 0.08}, "refine": {"cycles": 50, ...}}}

A stage may also be written as ``{"name": "sparsegpt", "blocksize": 64}`` in place of its name. Reports written
before stages had their own settings (flat ``owl_m``, ``dsnot_cycles``, ``blocksize`` ...) still load.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from secateurs.errors import SecateursError
from secateurs.oneshot.allocations.table import Table
from secateurs.oneshot.moe import check_unrouted
from secateurs.oneshot.registry import stage_class
from secateurs.oneshot.select import NM, check_sparsity, parse_nm
from secateurs.oneshot.stage import Allocation, Pruner, Refiner, Stage, Target, Update

STAGE_FIELDS = {"method": "pruner", "allocation": "allocation", "refine": "refiner", "update": "update"}
ORDER = ("allocation", "method", "refine", "update")  # the order in which the stages run
# flat settings of reports written before stages had their own: recipe field -> (stage field, setting)
LEGACY = {
    "blocksize": ("method", "blocksize"),
    "percdamp": ("method", "percdamp"),
    "owl_m": ("allocation", "m"),
    "owl_lambda": ("allocation", "lam"),
    "dsnot_cycles": ("refine", "cycles"),
    "dsnot_threshold": ("refine", "threshold"),
    "dsnot_power": ("refine", "power"),
    "dsnot_targets": ("refine", "targets"),
}


def make_stage(kind: str, spec, options: dict | None = None) -> Stage | None:
    """A stage config from a config object, a registered name, ``{"name": ..., **settings}``, or None/"none"."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        if kind in ("pruner", "allocation"):
            raise SecateursError(f"a recipe needs a {kind}")
        return None
    if isinstance(spec, Stage):
        if spec.kind != kind:
            raise SecateursError(f"{spec.name} is a {spec.kind}, not a {kind}")
        return spec
    settings = dict(options or {})
    if isinstance(spec, dict):
        settings = {**{k: v for k, v in spec.items() if k != "name"}, **settings}
        spec = spec.get("name")
        if not isinstance(spec, str):
            raise SecateursError(f"a {kind} given as a dict needs its 'name'")
    if kind == "allocation" and str(spec).endswith(".json"):
        return Table(path=str(spec))
    return stage_class(kind, spec).from_options(settings)


@dataclass
class Recipe:
    """A pruning recipe.

    ``sparsity`` is the fraction of weights zeroed in every prunable linear of the decoder layers (unstructured);
    ``pattern`` ("2:4": 2 zeros in every 4 consecutive input weights of a row) replaces it when given.
    ``method`` is the pruner, ``allocation`` the per-layer sparsity, ``refine`` an optional mask refinement and
    ``update`` an optional weight update of the final mask: each a config object (``secateurs.oneshot.registry``
    lists them), its registered name, or a dict ``{"name": ..., **settings}``. ``exclude`` holds glob patterns of
    linear names (e.g. ``"*.mlp.down_proj"``) to leave dense. Embeddings and the LM head are never pruned.
    ``unrouted_experts``: what becomes of an MoE expert that no calibration token was routed to, so that no
    statistics exist for it: ``"dense"`` (left whole) or ``"magnitude"`` (pruned by |W| to the layer's target); see
    :mod:`secateurs.oneshot.moe`.
    """

    method: Pruner | str | dict = "wanda"
    sparsity: float = 0.5
    pattern: str | None = None
    allocation: Allocation | str | dict = "uniform"
    refine: Refiner | str | dict | None = None
    update: Update | str | dict | None = None
    exclude: list[str] = field(default_factory=list)
    unrouted_experts: str = "dense"

    def __post_init__(self) -> None:
        for name, kind in STAGE_FIELDS.items():
            setattr(self, name, make_stage(kind, getattr(self, name)))
        if self.pattern is not None:
            self.pattern = str(self.nm)
            self.sparsity = self.nm.sparsity
        self.sparsity = check_sparsity(self.sparsity)
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        self.exclude = list(self.exclude)
        self.unrouted_experts = check_unrouted(self.unrouted_experts)

    def stages(self) -> list[Stage]:
        """The stages in the order they run: allocation, pruner, then the optional refiner and update."""
        return [s for s in (getattr(self, name) for name in ORDER) if s is not None]

    @property
    def needs_calibration(self) -> bool:
        """Whether any stage reads calibration statistics (magnitude alone needs no data)."""
        return any(stage.needs for stage in self.stages())

    @property
    def nm(self) -> NM | None:
        return parse_nm(self.pattern) if self.pattern is not None else None

    @property
    def target(self) -> Target:
        return Target(self.sparsity, self.nm)

    @property
    def label(self) -> str:
        """``sparsegpt + dsnot + admm``: the pruner and what follows it."""
        return " + ".join(s.name for s in self.stages()[1:])

    @property
    def pattern_name(self) -> str:
        allocation = "" if self.allocation.name == "uniform" else f", {self.allocation_name} allocation"
        for stage in (self.refine, self.update):
            if stage is not None:
                allocation += f", {stage.name}"
        return f"{self.pattern} (N:M){allocation}" if self.pattern else f"{self.sparsity:g} unstructured{allocation}"

    @property
    def allocation_name(self) -> str:
        """The allocation as the command line spells it: its name, or its file for a table."""
        return self.allocation.path if isinstance(self.allocation, Table) else self.allocation.name

    def excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude)

    def to_dict(self) -> dict:
        options = {}
        for name in ORDER:
            stage = getattr(self, name)
            if stage is not None and not isinstance(stage, Table):
                options[name] = stage.options()
        return {
            "method": self.method.name,
            "sparsity": self.sparsity,
            "pattern": self.pattern,
            "allocation": self.allocation_name,
            "refine": self.refine.name if self.refine else None,
            "update": self.update.name if self.update else None,
            "exclude": list(self.exclude),
            "unrouted_experts": self.unrouted_experts,
            "options": options,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        if not isinstance(data, dict):
            raise SecateursError(f"a recipe must be a mapping of fields, got {type(data).__name__}")
        data = dict(data)
        options = data.pop("options", None) or {}
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            raise SecateursError("recipe 'options' must map a stage (method, allocation, refine, update) to settings")
        legacy = {k: data.pop(k) for k in list(data) if k in LEGACY}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown or set(options) - set(STAGE_FIELDS):
            raise SecateursError(
                f"unknown recipe field(s): {', '.join(sorted(unknown | (set(options) - set(STAGE_FIELDS))))}"
            )
        for key, value in legacy.items():  # only the chosen stages' settings matter
            stage_field, setting = LEGACY[key]
            chosen = data.get(stage_field)
            wanted = {"method": "sparsegpt", "allocation": "owl", "refine": "dsnot"}[stage_field]
            if isinstance(chosen, str) and chosen.lower() == wanted:
                options.setdefault(stage_field, {})[setting] = value
        for name, kind in STAGE_FIELDS.items():
            if name in data or name in options:
                default = cls.__dataclass_fields__[name].default
                data[name] = make_stage(kind, data.get(name, default), options.get(name))
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the recipe as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        Path(path).write_text(dumps(self.to_dict(), path))

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe file (YAML or JSON, by suffix; JSON is also YAML) or a report.json that holds one."""
        content = read_file(path)
        if isinstance(content, dict) and isinstance(content.get("recipe"), dict):
            content = content["recipe"]  # a report: the recipe that made it
        return cls.from_dict(content)


def dumps(obj: dict, path: str | Path = "") -> str:
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_dump(obj, sort_keys=False)
    return json.dumps(obj, indent=2) + "\n"


def read_file(path: str | Path) -> object:
    """The content of a recipe file (YAML or JSON, by suffix); one error line when it cannot be read or parsed."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecateursError(
            f"cannot read recipe {path}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
        ) from None
    return loads(text, path)


def loads(text: str, path: str | Path = "") -> object:
    try:
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError: one line either way
        raise SecateursError(f"cannot parse recipe {path}: {str(exc).splitlines()[0]}") from None
