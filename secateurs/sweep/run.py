"""Running a sweep: load the model once, then prune, evaluate and record every missing cell (resumably)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from secateurs import data
from secateurs.analysis.summary import DEFAULT_TOLERANCE
from secateurs.api import default_eval_windows, evaluate
from secateurs.data.calibration import Calibration
from secateurs.evaluate.zeroshot import task_facts, zero_shot
from secateurs.measure import versions
from secateurs.models import check_seqlen, default_device, find_layers, load_model
from secateurs.oneshot.allocations.owl import OWL
from secateurs.oneshot.allocations.table import Table
from secateurs.oneshot.prune import check_recipe, prune
from secateurs.oneshot.recipe import Recipe
from secateurs.oneshot.walk import dense_walk
from secateurs.sweep.folder import DENSE_KEY, FORMAT, SweepFolder, settings_digest
from secateurs.sweep.grid import Grid, cell_key, restore_linears, snapshot_linears

log = logging.getLogger("secateurs")


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
    dtype: str = "auto"
    device: str = "auto"
    tolerance: float = DEFAULT_TOLERANCE
    fresh: bool = False
    progress: bool = True
    tasks: list[str] = field(default_factory=list)  # zero-shot tasks scored at every cell (lm-eval names)
    limit: int | float | None = None  # first N examples per task
    batch_size: int | str = 8  # zero-shot requests per forward pass

    def settings(self, recipes: list[Recipe]) -> dict:
        """What every cell shares; a folder's cells are only comparable (and reusable) under equal settings."""
        path = Path(self.model).expanduser()
        shared = {"exclude": list(self.grid.exclude), "stages": self.grid.stage_settings(recipes)}
        windows = default_eval_windows(self.eval_source) if self.eval_windows == "auto" else self.eval_windows
        evaluation = {
            "source": self.eval_source,
            "description": data.describe_source(self.eval_source),
            "seqlen": self.calibration.seqlen,
            "windows": windows,
            "bos": self.bos,
        }
        if self.tasks:  # only then: folders of sweeps without tasks keep their settings
            evaluation["tasks"] = {"names": list(self.tasks), "limit": self.limit, "num_fewshot": 0}
        return {
            "model": str(path.resolve()) if path.exists() else self.model,
            "dtype": self.dtype,
            "calibration": {**self.calibration.to_dict(), "description": data.describe_source(self.calibration.source)},
            "evaluation": evaluation,
            "recipe": shared,
        }

    def run(self) -> dict:
        """Run the missing cells (dense first), rebuilding the table and the page after each; return the JSON."""
        recipes = self.grid.recipes()
        for recipe in recipes:
            if isinstance(recipe.allocation, Table):
                recipe.allocation.check_file()
        device = default_device(self.device)
        facts = task_facts(self.tasks, self.limit) if self.tasks else {}  # a bad task name fails here, at once
        settings = self.settings(recipes)
        folder = SweepFolder(self.output)
        with folder.lock():
            folder.open(settings, self.fresh)
            settings_hash = settings_digest(settings)
            done = folder.read_cells(settings_hash)
            folder.write_plan([DENSE_KEY, *(cell_key(r) for r in recipes)])
            todo = [r for r in recipes if cell_key(r) not in done]
            log.info("sweep: %d cells, %d already finished in %s", len(recipes), len(recipes) - len(todo), folder.path)
            if not todo and DENSE_KEY in done:
                return folder.write_outputs(self.tolerance)

            log.info("loading %s", self.model)
            model, tokenizer, description = load_model(self.model, self.dtype)
            for recipe in todo:  # N:M widths, allocation tables ...: every cell, before the dense pass
                check_recipe(model, recipe)
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

            def accuracy() -> dict:
                """The cell's zero-shot scores (``{}`` without tasks)."""
                if not self.tasks:
                    return {}
                result = zero_shot(
                    model, tokenizer, self.tasks, limit=self.limit, batch_size=self.batch_size, progress=self.progress
                )
                log.info("accuracy in %.1f s  [%s]\n%s", result.seconds, result.protocol, result.table())
                return {"zero_shot": result.to_dict()}

            def finish(cell: dict) -> None:
                cell.update(format=FORMAT, settings_hash=settings_hash, finished=_now())
                folder.write_cell(cell)
                folder.write_outputs(self.tolerance)

            if DENSE_KEY not in done:
                log.info("dense model: perplexity and per-layer outlier ratios")
                owl = next((r.allocation for r in recipes if isinstance(r.allocation, OWL)), OWL())
                check_seqlen(model, self.calibration.seqlen)
                windows = self.calibration.windows(tokenizer)
                layers_name, _ = find_layers(model)
                ratios = dense_walk(
                    model,
                    windows,
                    device,
                    lambda index, weights, stats: owl.measure(weights, stats)["outlier_ratio"],
                    wanted=owl.needs,
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
                        **accuracy(),
                        **({"task_facts": {name: f.to_dict() for name, f in facts.items()}} if facts else {}),
                        "outlier_ratios": ratios,
                        "layer_names": [f"{layers_name}.{i}" for i in range(len(ratios))],
                        "versions": versions(),
                    }
                )
            dense_ppl = (folder.read_cells().get(DENSE_KEY) or {}).get("perplexity", {}).get("perplexity")
            bar = tqdm(
                total=len(recipes), initial=len(recipes) - len(todo), desc="sweep cells", disable=not self.progress
            )
            try:
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
                            **accuracy(),
                        }
                    )
                    ratio = f" ({ppl['perplexity'] / dense_ppl:.2f}x dense)" if dense_ppl else ""
                    log.info("%s: perplexity %.3f%s, sparsity %.4f", key, ppl["perplexity"], ratio, report.sparsity)
                    bar.update()
            finally:
                bar.close()  # also on Ctrl-C: the interrupt message then starts on a line of its own
            restore_linears(model, saved)
            return folder.write_outputs(self.tolerance)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
