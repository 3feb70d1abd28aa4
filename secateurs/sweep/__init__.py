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

With ``tasks`` (``--tasks``), every cell and the dense model are also scored zero-shot through lm-eval
(:mod:`secateurs.evaluate.zeroshot`), the scores stored in the cell files; the dense cell also records each task's
chance, choices and declared difficulty, from which the page draws its task-difficulty view
(:mod:`secateurs.analysis.difficulty`). The task names are checked before the model is loaded.
"""

from secateurs.sweep.folder import (
    CELLS,
    DENSE_KEY,
    SETTINGS_NAME,
    SweepFolder,
    settings_differences,
    write_atomic,
    write_json,
)
from secateurs.sweep.grid import Grid, cell_key, restore_linears, snapshot_linears
from secateurs.sweep.run import Sweep

__all__ = [
    "CELLS",
    "DENSE_KEY",
    "SETTINGS_NAME",
    "Grid",
    "Sweep",
    "SweepFolder",
    "cell_key",
    "restore_linears",
    "settings_differences",
    "snapshot_linears",
    "write_atomic",
    "write_json",
]
