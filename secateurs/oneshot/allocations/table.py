"""A user's own per-layer sparsities, from a JSON file: ``{"0": 0.6, "model.layers.1": 0.7, ...}`` or a list."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from secateurs.errors import SecateursError
from secateurs.oneshot.stage import Allocation, option


def read_table(path: str | Path) -> dict:
    """The file's table as ``{key: value}`` (a JSON list becomes index -> value); one clear error if unreadable."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SecateursError(f"cannot read allocation file {path}: {exc}") from None
    if isinstance(table, list):
        table = dict(enumerate(table))
    if not isinstance(table, dict):
        raise SecateursError(f"allocation file {path}: expected a JSON object layer -> sparsity, or a list")
    return table


def load_allocation(path: str | Path, layer_names: Sequence[str]) -> list[float]:
    """Every layer's sparsity from the file, by layer index or name (e.g. "model.layers.3"); every layer given."""
    by_index: dict[int, float] = {}
    for key, value in read_table(path).items():
        index = int(key) if str(key).isdigit() else (layer_names.index(key) if key in layer_names else None)
        if index is None or not 0 <= index < len(layer_names):
            raise SecateursError(
                f"allocation file {path}: unknown layer {key!r} (layers are 0..{len(layer_names) - 1})"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise SecateursError(f"allocation file {path}: sparsity of layer {key!r} must be in [0, 1), got {value!r}")
        by_index[index] = float(value)
    missing = [layer_names[i] for i in range(len(layer_names)) if i not in by_index]
    if missing:
        raise SecateursError(f"allocation file {path}: no sparsity for {len(missing)} layer(s), e.g. {missing[0]}")
    return [by_index[i] for i in range(len(layer_names))]


@dataclass(frozen=True)
class Table(Allocation):
    """Named by its file: ``--allocation my_layers.json``."""

    name: ClassVar[str] = "table"
    summary: ClassVar[str] = "a JSON file mapping layer index or name to its sparsity"

    path: str = option("", "the JSON file")

    def __post_init__(self) -> None:
        self.check(bool(self.path), "needs the path of a JSON file")

    def check_file(self) -> None:
        """Fail before any work when the file is missing or unreadable."""
        if not Path(self.path).is_file():
            raise SecateursError(f"allocation file not found: {self.path}")
        read_table(self.path)

    def allocate(self, target: float, layer_names: list[str], measures: list[dict] | None) -> list[float]:
        return load_allocation(self.path, layer_names)
