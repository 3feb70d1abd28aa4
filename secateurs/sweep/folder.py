"""A sweep folder: `sweep.json` (shared settings), `cells/*.json` (one per finished cell), the table and the page.

Every file is written atomically; a second sweep writing into the same folder is refused by a lock.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
from pathlib import Path

from secateurs.analysis.summary import DEFAULT_TOLERANCE, Results
from secateurs.errors import SecateursError

log = logging.getLogger("secateurs")

FORMAT = 1
SETTINGS_NAME = "sweep.json"
CELLS = "cells"
DENSE_KEY = "dense"
LOCK_NAME = ".lock"
PLAN_NAME = "plan.json"  # the cells the last run set out to finish: the outputs say how many of them are done


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a hidden temporary file beside ``path``, flush it to disk, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def settings_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def settings_differences(old: dict, new: dict) -> list[str]:
    """``"calibration.nsamples: 8 -> 16"`` for every leaf that differs."""
    a, b = _flatten(old), _flatten(new)
    return [
        f"{k}: {a.get(k, '(none)')} -> {b.get(k, '(none)')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]


class SweepFolder:
    """``DIR`` of a sweep: ``sweep.json`` (the shared settings), ``cells/*.json``, the table and the page."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().absolute()
        self.cells = self.path / CELLS

    def check_not_foreign(self) -> None:
        """Refuse a file, or a non-empty folder that holds no sweep, before creating anything."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise SecateursError(f"output {path} exists and is not a folder")
        if self._has_files() and not (path / SETTINGS_NAME).is_file():
            raise SecateursError(
                f"output folder {path} is not empty and holds no sweep ({SETTINGS_NAME}); use a new one"
            )

    def _has_files(self) -> bool:
        return self.path.is_dir() and any(p.name != LOCK_NAME for p in self.path.iterdir())

    @contextlib.contextmanager
    def lock(self):
        """Create the folder and hold it: refuse a second sweep writing into the same folder at the same time."""
        import fcntl

        self.check_not_foreign()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / LOCK_NAME, "w")
        except OSError as exc:
            raise SecateursError(f"cannot write the sweep folder {self.path}: {exc.strerror or exc}") from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise SecateursError(f"another sweep is writing into {self.path}") from None
            yield

    def open(self, settings: dict, fresh: bool = False) -> None:
        """Start the sweep folder (under :meth:`lock`), or check that it holds finished cells of the same settings.

        A folder without finished cells (say, the model failed to load) takes the new settings silently.
        """
        path = self.path
        finished = any(self.cells.glob("*.json"))
        if finished and not fresh:
            try:
                old = json.loads((path / SETTINGS_NAME).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise SecateursError(f"cannot read {path / SETTINGS_NAME}: {exc}; use --fresh to start over") from None
            diff = settings_differences(old.get("settings", {}), settings)
            if diff:
                raise SecateursError(
                    f"{path} holds a sweep with other settings ({'; '.join(diff[:4])}"
                    f"{'; ...' if len(diff) > 4 else ''}): use the same settings to resume, --fresh to discard its "
                    "cells, or another --output"
                )
        try:
            if fresh:
                shutil.rmtree(self.cells, ignore_errors=True)
                for name in ("results.csv", "results.json", "report.html"):
                    (path / name).unlink(missing_ok=True)
            self.cells.mkdir(exist_ok=True)
            for stale in self.cells.glob(".*.tmp-*"):  # a run killed mid-write (kill -9, power loss)
                stale.unlink()
            write_json(path / SETTINGS_NAME, {"format": FORMAT, "settings": settings})
        except OSError as exc:
            raise SecateursError(f"cannot write the sweep folder {path}: {exc.strerror or exc}") from None

    def write_plan(self, keys: list[str]) -> None:
        """Record the cells this run sets out to finish (under :meth:`lock`)."""
        write_json(self.path / PLAN_NAME, {"format": FORMAT, "cells": list(keys)})

    def progress(self, done: set[str]) -> dict:
        """{"planned", "done", "missing", "complete"}: the planned cells against ``done``, the keys of the finished
        ones (without a plan, the finished ones are all there is)."""
        try:
            planned = json.loads((self.path / PLAN_NAME).read_text())["cells"]
            planned = [k for k in planned if isinstance(k, str)]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            planned = sorted(done)
        missing = [k for k in planned if k not in done]
        return {
            "planned": len(planned),
            "done": len(planned) - len(missing),
            "missing": missing,
            "complete": not missing,
        }

    def settings(self) -> dict:
        try:
            return json.loads((self.path / SETTINGS_NAME).read_text())["settings"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise SecateursError(f"{self.path} is not a readable sweep folder: {exc}") from None

    def cell_path(self, key: str) -> Path:
        return self.cells / f"{key}.json"

    def read_cells(self, settings_hash: str | None = None) -> dict[str, dict]:
        """The finished cells by key; unreadable files are skipped with a warning (they get recomputed)."""
        out = {}
        for path in sorted(self.cells.glob("*.json")):
            try:
                cell = json.loads(path.read_text())
                key = cell["key"]
                if cell.get("format") != FORMAT or key != path.stem:
                    raise ValueError("not a cell of this format")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable cell file %s (%s)", path, exc)
                continue
            if settings_hash is not None and cell.get("settings_hash") != settings_hash:
                raise SecateursError(
                    f"cell {path} was computed with other settings than {self.path / SETTINGS_NAME}; "
                    "use --fresh to start over"
                )
            out[key] = cell
        return out

    def write_cell(self, cell: dict) -> None:
        write_json(self.cell_path(cell["key"]), cell)

    def results(self) -> Results:
        """The finished cells as a :class:`Results` (what the table and the page are made from)."""
        settings = self.settings()
        cells = self.read_cells()
        dense = cells.pop(DENSE_KEY, None)
        return Results(
            kind="sweep",
            model=(dense or {}).get("model_description") or settings["model"],
            cells=sorted(cells.values(), key=lambda c: c["key"]),
            dense_perplexity=dense.get("perplexity") if dense else None,
            outlier_ratios=dense.get("outlier_ratios") if dense else None,
            dense_zero_shot=dense.get("zero_shot") if dense else None,
            task_facts=dense.get("task_facts") if dense else None,
            settings={
                **settings,
                "evaluation": {
                    **settings.get("evaluation", {}),
                    "protocol": dense["perplexity"]["protocol"] if dense else None,
                },
                "owl_m": next(
                    (
                        v.get("m")
                        for k, v in settings.get("recipe", {}).get("stages", {}).items()
                        if k == "allocation:owl"
                    ),
                    None,
                ),
                "versions": dense.get("versions") if dense else None,
            },
            title=f"secateurs sweep: {Path(settings['model']).name}",
        )

    def write_outputs(self, tolerance: float = DEFAULT_TOLERANCE) -> dict:
        """Rebuild ``results.json``, ``results.csv`` and ``report.html`` from the cell files; return the JSON."""
        from secateurs.analysis.difficulty import difficulty_summary
        from secateurs.analysis.html import render_page

        results = self.results()
        rows = results.rows()
        knees = results.knees(tolerance)
        done = {cell["key"] for cell in results.cells} | ({DENSE_KEY} if results.dense_perplexity else set())
        progress = self.progress(done)
        note = None
        if not progress["complete"]:
            note = (
                f"Incomplete: {progress['done']} of {progress['planned']} cells finished (missing: "
                f"{', '.join(progress['missing'][:6])}{', ...' if len(progress['missing']) > 6 else ''}). Run the "
                "same sweep command again to finish it."
            )
        summary = {
            "complete": progress["complete"],
            "cells": {"planned": progress["planned"], "done": progress["done"], "missing": progress["missing"]},
            "settings": results.settings,
            "dense": {"perplexity": results.dense_perplexity, "outlier_ratios": results.outlier_ratios},
            "knee_tolerance": tolerance,
            "essential_sparsity": {
                name: {
                    "sparsity": k.sparsity,
                    "below_grid": k.below,
                    "beyond_grid": k.beyond,
                    "perplexity_limit": k.threshold,
                }
                for name, k in knees.items()
            },
            "rows": rows,
            **({"task_difficulty": difficulty_summary(results)} if results.dense_zero_shot else {}),
            "folder": str(self.path),
        }
        write_json(self.path / "results.json", summary)
        write_atomic(self.path / "results.csv", rows_csv(rows, results.dense, progress["complete"]))
        write_atomic(self.path / "report.html", render_page(results, tolerance, note=note))
        return summary


CSV_COLUMNS = [
    "key",
    "method",
    "allocation",
    "refine",
    "update",
    "target",
    "sparsity_target",
    "sparsity",
    "perplexity",
    "vs_dense",
    "mean_output_error",
    "prune_seconds",
    "eval_seconds",
    "best",
    "sweep_complete",
]


def rows_csv(rows: list[dict], dense: float | None, complete: bool = True) -> str:
    """The table as CSV; every row says whether the sweep it comes from had finished all its planned cells."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    mark = {"sweep_complete": str(bool(complete)).lower()}
    if dense is not None:
        writer.writerow(
            {"key": DENSE_KEY, "target": 0, "sparsity_target": 0, "sparsity": 0, "perplexity": dense, **mark}
        )
    writer.writerows({**row, **mark} for row in rows)
    return buf.getvalue()
