"""The task-difficulty study of a sweep folder as Markdown tables: do harder tasks lose more when pruned?

Reads a folder written by ``secateurs sweep ... --tasks ...`` (its cell files, through the same code as the page)
and prints, with the protocol: one row per task in difficulty order (declared level, chance, dense accuracy ±
standard error), then per method the accuracy ± standard error and the retained accuracy
(acc − chance) / (dense − chance) at every swept sparsity, and each task's essential sparsity (the highest swept
sparsity up to which retained accuracy stays ≥ 0.99 at every swept sparsity).

    secateurs sweep smollm2-135m --methods magnitude,wanda --sparsities 0.2,0.4,0.5,0.6,0.7 \\
        --nsamples 16 --seqlen 256 --eval-windows 8 \\
        --tasks bible_next_2_far,bible_next_4_far,bible_next_4_near,bible_next_8_near --limit 100 \\
        --output out/junk-dna-smollm2
    python benchmarks/task_difficulty.py out/junk-dna-smollm2
"""

from __future__ import annotations

import argparse
import json

from secateurs.analysis.difficulty import RETAINED_THRESHOLD, task_rows
from secateurs.sweep import SweepFolder


def pm(value: float, error: float | None) -> str:
    return f"{value:.3f}" + (f" ± {error:.3f}" if error is not None else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a sweep folder with task scores")
    parser.add_argument("--threshold", type=float, default=RETAINED_THRESHOLD, help="retained accuracy threshold")
    args = parser.parse_args(argv)
    folder = SweepFolder(args.folder)
    results = folder.results()
    rows = task_rows(results, args.threshold)
    if not rows:
        raise SystemExit(f"{args.folder}: no task scores (run the sweep with --tasks)")
    settings = folder.settings()
    dense = results.dense_zero_shot
    print(f"model: {results.model}")
    print(f"calibration: {json.dumps({k: v for k, v in settings['calibration'].items() if k != 'description'})}")
    print(f"zero-shot protocol: {dense.get('protocol')}")
    print("score: acc_norm where the task reports it, else acc; retained = (acc - chance) / (dense - chance)")
    print(f"essential sparsity (ES): highest swept sparsity with retained >= {args.threshold:g} there and below\n")

    series = list(dict.fromkeys(name for row in rows for name in row.curves))
    print("| task | level | chance | n | dense |" + "".join(f" ES {s} |" for s in series))
    print("|---|---|---|---|---|" + "---|" * len(series))
    for row in rows:
        es = [row.essential[s].label() if row.essential.get(s) else "–" for s in series]
        level = "–" if row.difficulty is None else f"{row.difficulty:g}"
        print(
            f"| {row.task} | {level} | {row.chance:.3f} | {row.examples} | {pm(row.dense, row.dense_stderr)} |"
            + "".join(f" {e} |" for e in es)
        )
    for name in series:
        sparsities = sorted({p.sparsity for row in rows for p in row.curves.get(name, [])})
        print(f"\n{name}: accuracy ± standard error (retained accuracy)\n")
        print("| task | " + " | ".join(f"{s:g}" for s in sparsities) + " |")
        print("|---|" + "---|" * len(sparsities))
        for row in rows:
            points = {p.sparsity: p for p in row.curves.get(name, [])}
            cells = []
            for s in sparsities:
                p = points.get(s)
                retained = "" if p is None or p.retained is None else f" ({p.retained:.2f})"
                cells.append("–" if p is None else pm(p.accuracy, p.stderr) + retained)
            print(f"| {row.task} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
