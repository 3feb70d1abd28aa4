"""``secateurs report DIR``: the per-layer page of one pruned output folder (or the page of a sweep folder)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from secateurs.analysis.summary import DEFAULT_TOLERANCE, Results
from secateurs.errors import SecateursError

log = logging.getLogger("secateurs")

REPORT_NAME = "report.json"


def folder_results(folder: str | Path) -> Results:
    """Results of one pruned output folder, from its ``report.json`` (as written by ``secateurs prune``)."""
    folder = Path(folder)
    path = folder / REPORT_NAME
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise SecateursError(f"{folder} holds no {REPORT_NAME} (not a pruned output folder, nor a sweep)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SecateursError(f"cannot read {path}: {exc}") from None
    if not isinstance(report, dict) or not {"recipe", "layers", "sparsity"} <= set(report):
        raise SecateursError(f"{path} is not a pruning report (needs recipe, layers, sparsity)")
    perplexity = report.get("perplexity") or {}
    ratios = [layer.get("outlier_ratio") for layer in report["layers"]]
    evaluation = perplexity.get("pruned") or perplexity.get("dense")
    return Results(
        kind="folder",
        model=report.get("model") or str(folder),
        cells=[
            {"key": folder.name, "recipe": report["recipe"], "report": report, "perplexity": perplexity.get("pruned")}
        ],
        dense_perplexity=perplexity.get("dense"),
        outlier_ratios=ratios if all(r is not None for r in ratios) and ratios else None,
        settings={
            "dtype": report.get("dtype"),
            "calibration": report.get("calibration"),
            "evaluation": {"protocol": evaluation["protocol"]} if evaluation else None,
            "device": report.get("device"),
            "owl_m": report["recipe"].get("owl_m"),
            "versions": report.get("versions"),
        },
        title=f"secateurs report: {folder.name}",
    )


def write_report(folder: str | Path, output: str | Path | None = None, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Write the page of a pruned folder (``FOLDER/report.html`` by default) or rebuild a sweep folder's outputs."""
    from secateurs.analysis.html import render_page
    from secateurs.sweep import SETTINGS_NAME, SweepFolder, write_atomic

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SecateursError(f"{folder} is not a folder")
    if (folder / SETTINGS_NAME).is_file():
        sweep = SweepFolder(folder)
        summary = sweep.write_outputs(tolerance) if output is None else None
        if output is not None:
            _write(Path(output), render_page(sweep.results(), tolerance), write_atomic)
        return {"kind": "sweep", "html": str(Path(output or folder / "report.html")), "summary": summary}
    results = folder_results(folder)
    target = Path(output) if output else folder / "report.html"
    _write(target, render_page(results, tolerance), write_atomic)
    return {"kind": "folder", "html": str(target), "rows": results.rows()}


def _write(path: Path, text: str, write_atomic) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
    except OSError as exc:
        raise SecateursError(f"cannot write {path}: {exc.strerror or exc}") from None


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(
        name,
        help="HTML page with per-layer views of a pruned output folder (or rebuild a sweep folder's page)",
        description="Write DIR/report.html: per-layer views (sparsity given and reached, outlier ratio, output "
        "reconstruction error) of a pruned output folder, from its report.json; for a sweep folder, rebuild its "
        "table and page.",
    )
    p.add_argument("folder", metavar="DIR", help="a pruned output folder (with report.json) or a sweep folder")
    p.add_argument("--output", "-o", default=None, metavar="FILE.html", help="where to write (default DIR/report.html)")
    p.add_argument(
        "--knee-tolerance",
        type=float,
        metavar="T",
        default=DEFAULT_TOLERANCE,
        help="sweeps: essential sparsity where perplexity first exceeds dense x (1 + this) (default 0.2)",
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no log lines")
    p.set_defaults(run=run)


def run(args) -> dict:
    if args.knee_tolerance < 0:
        raise SecateursError(f"--knee-tolerance must be >= 0, got {args.knee_tolerance}")
    out = write_report(args.folder, args.output, args.knee_tolerance)
    log.info("wrote %s", out["html"])
    return out
