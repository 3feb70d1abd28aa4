"""``secateurs report DIR``: the per-layer page of one pruned output folder (or the page of a sweep folder)."""

from __future__ import annotations

import logging
from pathlib import Path

from secateurs.analysis.folder import folder_results
from secateurs.analysis.html import render_page
from secateurs.analysis.summary import DEFAULT_TOLERANCE
from secateurs.errors import SecateursError
from secateurs.sweep import SETTINGS_NAME, SweepFolder, write_atomic

log = logging.getLogger("secateurs")


def write_report(folder: str | Path, output: str | Path | None = None, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Write the page of a pruned folder (``FOLDER/report.html`` by default) or rebuild a sweep folder's outputs."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SecateursError(f"{folder} is not a folder")
    if (folder / SETTINGS_NAME).is_file():
        sweep = SweepFolder(folder)
        summary = sweep.write_outputs(tolerance) if output is None else None
        if output is not None:
            _write(Path(output), render_page(sweep.results(), tolerance))
        return {"kind": "sweep", "html": str(Path(output or folder / "report.html")), "summary": summary}
    try:
        results = folder_results(folder)
        page = render_page(results, tolerance)
    except (AttributeError, TypeError, KeyError, ValueError) as exc:  # a report.json with fields of other types
        raise SecateursError(
            f"{folder / 'report.json'} is not a report secateurs can read (a field has the wrong type or is "
            f"missing: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    target = Path(output) if output else folder / "report.html"
    _write(target, page)
    return {"kind": "folder", "html": str(target), "rows": results.rows()}


def _write(path: Path, text: str) -> None:
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
