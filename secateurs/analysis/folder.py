"""The results of one pruned output folder, read back from its ``report.json``."""

from __future__ import annotations

import json
from pathlib import Path

from secateurs.analysis.summary import Results, owl_m
from secateurs.errors import SecateursError

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
            "owl_m": owl_m(report["recipe"]),
            "versions": report.get("versions"),
        },
        title=f"secateurs report: {folder.name}",
    )
