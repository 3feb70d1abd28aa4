"""``secateurs sweep``: prune one model over a grid of recipes, resumably, and write a table and an HTML page.

The grid is methods x (sparsities + N:M patterns) x allocations x refinements. The model is loaded once and the
dense weights of its prunable linears are kept on the CPU; each *cell* restores them, prunes, evaluates, and is
written atomically to ``DIR/cells/<key>.json``. After every cell the table (``results.csv``, ``results.json``)
and the page (``report.html``) are rebuilt from the cell files. Rerunning the same command skips the finished
cells, so an interrupted sweep resumes where it stopped; a later run may add methods or sparsities to the grid.
Shared settings (model, calibration, evaluation, recipe options) are fixed per folder in ``DIR/sweep.json``:
a run with other settings is refused unless ``--fresh`` (which discards the old cells).

The folder also holds ``cells/dense.json``: the dense model's perplexity and per-layer outlier ratios, from
one pass through the dense model, so every sweep can show its outlier profile.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from secateurs import data
from secateurs.analysis.summary import DEFAULT_TOLERANCE, Results
from secateurs.errors import SecateursError
from secateurs.recipe import Calibration, Recipe

log = logging.getLogger("secateurs")

FORMAT = 1
SETTINGS_NAME = "sweep.json"
CELLS = "cells"
DENSE_KEY = "dense"
LOCK_NAME = ".lock"


# ------------------------------------------------------------------------------------------------- files
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


def _digest(obj) -> str:
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


# ------------------------------------------------------------------------------------------------- grid
def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def cell_key(recipe: Recipe) -> str:
    """A readable file-name key: ``wanda-0.5-uniform``, ``sparsegpt-2of4-owl-dsnot``."""
    target = recipe.pattern.replace(":", "of") if recipe.pattern else f"{recipe.sparsity:g}"
    allocation = (
        recipe.allocation if recipe.allocation in ("uniform", "owl") else f"file-{Path(recipe.allocation).stem}"
    )
    parts = [recipe.method, target, allocation] + ([recipe.refine] if recipe.refine else [])
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


@dataclass
class Grid:
    """What varies between cells; every combination is one cell."""

    methods: list[str] = field(default_factory=lambda: ["wanda"])
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7])
    patterns: list[str] = field(default_factory=list)
    allocations: list[str] = field(default_factory=lambda: ["uniform"])
    refines: list[str | None] = field(default_factory=lambda: [None])

    def recipes(self, **shared) -> list[Recipe]:
        """One Recipe per cell (validated: a bad method, sparsity or pattern fails here, before any work)."""
        targets = [{"sparsity": s} for s in self.sparsities] + [{"pattern": p} for p in self.patterns]
        if not (self.methods and targets and self.allocations and self.refines):
            raise SecateursError("the sweep grid is empty: give at least one method, sparsity or pattern, allocation")
        recipes = [
            Recipe(method=method, allocation=allocation, refine=refine, **target, **shared)
            for method in self.methods
            for target in targets
            for allocation in self.allocations
            for refine in self.refines
        ]
        keys = [cell_key(r) for r in recipes]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise SecateursError(f"the sweep grid repeats cell(s): {', '.join(dupes)}")
        return recipes


# ------------------------------------------------------------------------------------------------- dense weights
def snapshot_linears(model) -> dict[str, torch.Tensor]:
    """CPU copies of the weights of every linear in the decoder layers (the only tensors pruning changes)."""
    from secateurs.models import find_layers, find_linears

    name, layers = find_layers(model)
    return {
        f"{name}.{i}.{n}": m.weight.detach().to("cpu", copy=True)
        for i, layer in enumerate(layers)
        for n, m in find_linears(layer).items()
    }


@torch.no_grad()
def restore_linears(model, saved: dict[str, torch.Tensor]) -> None:
    """Put back the weights saved by :func:`snapshot_linears`."""
    for name, weight in saved.items():
        model.get_submodule(name).weight.copy_(weight)


# ------------------------------------------------------------------------------------------------- folder
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
            settings={
                **settings,
                "evaluation": {
                    **settings.get("evaluation", {}),
                    "protocol": dense["perplexity"]["protocol"] if dense else None,
                },
                "owl_m": settings.get("recipe", {}).get("owl_m"),
                "versions": dense.get("versions") if dense else None,
            },
            title=f"secateurs sweep: {Path(settings['model']).name}",
        )

    def write_outputs(self, tolerance: float = DEFAULT_TOLERANCE) -> dict:
        """Rebuild ``results.json``, ``results.csv`` and ``report.html`` from the cell files; return the JSON."""
        from secateurs.analysis.html import render_page

        results = self.results()
        rows = results.rows()
        knees = results.knees(tolerance)
        summary = {
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
            "folder": str(self.path),
        }
        write_json(self.path / "results.json", summary)
        write_atomic(self.path / "results.csv", rows_csv(rows, results.dense))
        write_atomic(self.path / "report.html", render_page(results, tolerance))
        return summary


CSV_COLUMNS = [
    "key",
    "method",
    "allocation",
    "refine",
    "target",
    "sparsity_target",
    "sparsity",
    "perplexity",
    "vs_dense",
    "mean_output_error",
    "prune_seconds",
    "eval_seconds",
    "best",
]


def rows_csv(rows: list[dict], dense: float | None) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    if dense is not None:
        writer.writerow({"key": DENSE_KEY, "target": 0, "sparsity_target": 0, "sparsity": 0, "perplexity": dense})
    writer.writerows(rows)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- running
@dataclass
class Sweep:
    """A sweep to run: the model, the grid, the shared protocol, and where the results go."""

    model: str
    grid: Grid
    output: str | Path
    calibration: Calibration = field(default_factory=Calibration)
    eval_source: str = "bible"
    eval_windows: int | None | str = "auto"
    bos: bool | None = None
    recipe_options: dict = field(default_factory=dict)  # exclude, blocksize, percdamp, owl_m, owl_lambda, ...
    dtype: str = "auto"
    device: str = "auto"
    tolerance: float = DEFAULT_TOLERANCE
    fresh: bool = False
    progress: bool = True

    def settings(self, recipes: list[Recipe]) -> dict:
        """What every cell shares; a folder's cells are only comparable (and reusable) under equal settings."""
        from secateurs.api import default_eval_windows

        path = Path(self.model).expanduser()
        shared = {k: v for k, v in recipes[0].to_dict().items() if k not in ("method", "sparsity", "pattern")}
        for k in ("allocation", "refine"):
            shared.pop(k)
        windows = default_eval_windows(self.eval_source) if self.eval_windows == "auto" else self.eval_windows
        return {
            "model": str(path.resolve()) if path.exists() else self.model,
            "dtype": self.dtype,
            "calibration": {**self.calibration.to_dict(), "description": data.describe_source(self.calibration.source)},
            "evaluation": {
                "source": self.eval_source,
                "description": data.describe_source(self.eval_source),
                "seqlen": self.calibration.seqlen,
                "windows": windows,
                "bos": self.bos,
            },
            "recipe": shared,
        }

    def run(self) -> dict:
        """Run the missing cells (dense first), rebuilding the table and the page after each; return the JSON."""
        from secateurs.allocation import layer_outlier_ratio
        from secateurs.api import evaluate, prune
        from secateurs.engine import dense_walk
        from secateurs.models import check_seqlen, default_device, find_layers, load_model
        from secateurs.report import versions

        recipes = self.grid.recipes(**self.recipe_options)
        for recipe in recipes:
            if recipe.allocation.endswith(".json") and not Path(recipe.allocation).is_file():
                raise SecateursError(f"allocation file not found: {recipe.allocation}")
        device = default_device(self.device)
        settings = self.settings(recipes)
        folder = SweepFolder(self.output)
        with folder.lock():
            folder.open(settings, self.fresh)
            settings_hash = _digest(settings)
            done = folder.read_cells(settings_hash)
            todo = [r for r in recipes if cell_key(r) not in done]
            log.info("sweep: %d cells, %d already finished in %s", len(recipes), len(recipes) - len(todo), folder.path)
            if not todo and DENSE_KEY in done:
                return folder.write_outputs(self.tolerance)

            log.info("loading %s", self.model)
            model, tokenizer, description = load_model(self.model, self.dtype)
            if device.type == "cuda":
                model.to(device)
            saved = snapshot_linears(model)

            def score():
                start = time.perf_counter()
                result = evaluate(
                    model,
                    tokenizer,
                    self.eval_source,
                    seqlen=self.calibration.seqlen,
                    max_windows=self.eval_windows,
                    bos=self.bos,
                    progress=self.progress,
                )
                return result.to_dict(), time.perf_counter() - start

            def finish(cell: dict) -> None:
                cell.update(format=FORMAT, settings_hash=settings_hash, finished=_now())
                folder.write_cell(cell)
                folder.write_outputs(self.tolerance)

            if DENSE_KEY not in done:
                log.info("dense model: perplexity and per-layer outlier ratios")
                owl_m = recipes[0].owl_m
                check_seqlen(model, self.calibration.seqlen)
                windows = self.calibration.windows(tokenizer)
                layers_name, _ = find_layers(model)
                ratios = dense_walk(
                    model,
                    windows,
                    device,
                    lambda index, linears, stats: layer_outlier_ratio(linears, stats, owl_m),
                    skip=recipes[0].excluded,
                    progress=self.progress,
                )
                ppl, seconds = score()
                log.info("dense perplexity %.3f  [%s]", ppl["perplexity"], ppl["protocol"])
                finish(
                    {
                        "key": DENSE_KEY,
                        "model_description": description,
                        "perplexity": ppl,
                        "eval_seconds": seconds,
                        "outlier_ratios": ratios,
                        "layer_names": [f"{layers_name}.{i}" for i in range(len(ratios))],
                        "versions": versions(),
                    }
                )
            dense_ppl = (folder.read_cells().get(DENSE_KEY) or {}).get("perplexity", {}).get("perplexity")
            bar = tqdm(
                total=len(recipes), initial=len(recipes) - len(todo), desc="sweep cells", disable=not self.progress
            )
            for recipe in todo:
                key = cell_key(recipe)
                bar.set_postfix_str(key)
                restore_linears(model, saved)
                report = prune(
                    model,
                    recipe,
                    self.calibration if recipe.needs_calibration else None,
                    tokenizer=tokenizer,
                    device=device,
                    progress=self.progress,
                )
                ppl, seconds = score()
                finish(
                    {
                        "key": key,
                        "recipe": recipe.to_dict(),
                        "report": report.to_dict(),
                        "perplexity": ppl,
                        "eval_seconds": seconds,
                    }
                )
                ratio = f" ({ppl['perplexity'] / dense_ppl:.2f}x dense)" if dense_ppl else ""
                log.info("%s: perplexity %.3f%s, sparsity %.4f", key, ppl["perplexity"], ratio, report.sparsity)
                bar.update()
            bar.close()
            restore_linears(model, saved)
            return folder.write_outputs(self.tolerance)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------- command line
def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in _split(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_parser(subparsers, name: str) -> None:
    from secateurs.cli import add_common, add_eval

    p = subparsers.add_parser(
        name,
        help="prune one model over a grid of recipes (resumable); table and HTML report with plots",
        description="Prune one model over a grid of recipes, resumably (rerun the same command to resume), and "
        "write results.csv, results.json and a static report.html with plots into the output folder.",
    )
    p.add_argument("model", nargs="?", default="smollm2-135m", help="hub id, local HF folder, .gguf file, smollm2-135m")
    p.add_argument(
        "--methods", default="wanda", metavar="M,...", help="comma-separated: magnitude,wanda,sparsegpt (default wanda)"
    )
    p.add_argument(
        "--sparsities",
        type=_floats,
        default=None,
        metavar="S,...",
        help="comma-separated unstructured sparsities (default 0.5,0.6,0.7, or none when --patterns is given)",
    )
    p.add_argument("--patterns", default="", metavar="N:M,...", help="comma-separated N:M patterns, e.g. 2:4,4:8")
    p.add_argument(
        "--allocations",
        default="uniform",
        metavar="A,...",
        help="comma-separated: uniform,owl,FILE.json (default uniform)",
    )
    p.add_argument("--refine", default="none", metavar="R,...", help="comma-separated: none,dsnot (default none)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="leave matching linears dense")
    p.add_argument("--calibration", default="shakespeare", metavar="SOURCE", help="calibration text (as for prune)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window, calibration and evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT damping (fraction of mean diag H)")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M (default 5)")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL sparsity half-range lambda (default 0.08)")
    add_eval(p, "bible")
    p.add_argument(
        "--knee-tolerance",
        type=float,
        metavar="T",
        default=DEFAULT_TOLERANCE,
        help="essential sparsity: where perplexity first exceeds dense x (1 + this) (default 0.2)",
    )
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="sweep folder (created, or resumed)")
    p.add_argument("--fresh", action="store_true", help="discard the cells of an existing sweep folder first")
    add_common(p)
    p.set_defaults(run=run)


def run(args) -> dict:
    """``secateurs sweep``: build the :class:`Sweep` from the arguments and run it."""
    if not args.eval or args.eval.lower() == "none":
        raise SecateursError("sweep needs an evaluation text (--eval SOURCE)")
    if args.knee_tolerance < 0:
        raise SecateursError(f"--knee-tolerance must be >= 0, got {args.knee_tolerance}")
    patterns = _split(args.patterns)
    sparsities = args.sparsities if args.sparsities is not None else ([] if patterns else [0.5, 0.6, 0.7])
    grid = Grid(
        methods=_split(args.methods),
        sparsities=sparsities,
        patterns=patterns,
        allocations=_split(args.allocations),
        refines=[None if r.lower() == "none" else r for r in _split(args.refine)],
    )
    sweep = Sweep(
        model=args.model,
        grid=grid,
        output=args.output,
        calibration=Calibration(args.calibration, args.nsamples, args.seqlen, args.seed),
        eval_source=args.eval,
        eval_windows=args.eval_windows,
        bos={"auto": None, "always": True, "never": False}[args.bos],
        recipe_options=dict(
            exclude=args.exclude,
            blocksize=args.blocksize,
            percdamp=args.percdamp,
            owl_m=args.owl_m,
            owl_lambda=args.owl_lambda,
        ),
        dtype=args.dtype,
        device=args.device,
        tolerance=args.knee_tolerance,
        fresh=args.fresh,
        progress=not args.quiet,
    )
    try:
        return sweep.run()
    except KeyboardInterrupt:
        raise SecateursError(
            f"interrupted; the finished cells are kept in {Path(args.output) / CELLS}: run the same command again "
            "to resume"
        ) from None
