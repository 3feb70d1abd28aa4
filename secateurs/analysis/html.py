"""One static, self-contained HTML page for a results set: summary, plots (inline PNG), table, protocol.

No JavaScript and no external files: the page opens from disk, from a mail attachment, or from CI artifacts.
"""

from __future__ import annotations

import base64
import html
import math
from datetime import datetime, timezone

from secateurs.analysis import plots
from secateurs.analysis.summary import DEFAULT_TOLERANCE, Results

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
       background: #fafafa; }
main { max-width: 1060px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 6px; }
h2 { font-size: 20px; margin: 34px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.lead { color: #444; margin-top: 4px; }
.warning { background: #fff3cd; border: 1px solid #e0b000; padding: 8px 12px; }
.findings { background: #f3f7fb; border-left: 4px solid #1f77b4; padding: 10px 16px; margin: 16px 0; }
.findings li { margin: 3px 0; }
figure { margin: 12px 0 8px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 14px; margin-top: 6px; }
table { border-collapse: collapse; font-size: 13.5px; margin: 10px 0; }
th, td { padding: 4px 9px; border-bottom: 1px solid #e6e6e6; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; position: sticky; top: 0; }
td.l, th.l { text-align: left; }
tr.best td { background: #e6f4e6; font-weight: 600; }
tr.dense td { background: #f6f6f6; font-style: italic; }
tr.group td { border-top: 2px solid #bbb; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; font-size: 14px; }
dt { color: #666; } dd { margin: 0; word-break: break-word; }
.muted { color: #777; font-size: 13px; }
"""


def fmt_ppl(x: float | None) -> str:
    if x is None:
        return "–"
    if not math.isfinite(x):
        return str(x)
    return f"{x:,.2f}" if x < 1000 else f"{x:,.0f}"


def fmt(x, spec: str = ".3g") -> str:
    return "–" if x is None else format(x, spec)


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _figure(png: bytes | None, alt: str, caption: str, ident: str) -> str:
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure id="{ident}"><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _table(results: Results) -> str:
    head = (
        "<tr><th class=l>method</th><th class=l>allocation</th><th class=l>refine</th><th>target</th>"
        "<th>achieved sparsity</th><th>perplexity</th><th>× dense</th><th>mean output error</th>"
        "<th>prune s</th></tr>"
    )
    body = []
    if results.dense:
        body.append(
            f'<tr class="dense"><td class=l>dense model</td><td class=l></td><td class=l></td><td>0</td><td>0</td>'
            f"<td>{fmt_ppl(results.dense)}</td><td>1</td><td></td><td></td></tr>"
        )
    previous = None
    for row in results.rows():
        classes = [c for c, on in (("best", row["best"]), ("group", previous not in (None, row["target"]))) if on]
        previous = row["target"]
        body.append(
            f'<tr class="{" ".join(classes)}" data-key="{_e(row["key"])}">'
            f"<td class=l>{_e(row['method'])}</td><td class=l>{_e(row['allocation'])}</td>"
            f"<td class=l>{_e(row['refine'])}</td><td>{_e(row['target'])}</td>"
            f"<td>{row['sparsity']:.1%}</td><td>{fmt_ppl(row['perplexity'])}</td>"
            f"<td>{fmt(row['vs_dense'], '.2f')}</td><td>{fmt(row['mean_output_error'], '.3g')}</td>"
            f"<td>{row['prune_seconds']:.1f}</td></tr>"
        )
    return f'<table id="results"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def _layer_table(results: Results) -> str:
    """Per decoder layer of a single pruned model: target, achieved, outlier ratio, output error, seconds."""
    report = results.cells[0]["report"]
    ratios = results.outlier_ratios
    rows = []
    for layer in report["layers"]:
        numel = sum(lin["numel"] for lin in layer["linears"])
        zeros = sum(lin["zeros"] for lin in layer["linears"])
        ratio = ratios[layer["index"]] if ratios else None
        rows.append(
            f"<tr><td class=l>{_e(layer['name'])}</td><td>{layer['sparsity_target']:.1%}</td>"
            f"<td>{zeros / numel if numel else 0:.1%}</td><td>{fmt(ratio, '.3%') if ratio is not None else '–'}</td>"
            f"<td>{fmt(layer.get('output_error'), '.3g')}</td><td>{layer['seconds']:.2f}</td></tr>"
        )
    head = (
        "<tr><th class=l>layer</th><th>target sparsity</th><th>achieved</th><th>outlier ratio</th>"
        "<th>output error</th><th>seconds</th></tr>"
    )
    return f'<table id="layers-table"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _findings(results: Results, tolerance: float) -> str:
    items = []
    if results.dense:
        items.append(f"Dense model perplexity: <b>{fmt_ppl(results.dense)}</b>.")
    knees = results.knees(tolerance) if results.kind == "sweep" else {}
    if knees:
        text = ", ".join(f"{_e(name)} <b>{knee.label()}</b>" for name, knee in knees.items())
        items.append(
            f"Essential sparsity (perplexity stays within +{tolerance:.0%} of dense up to there): {text}. "
            "Higher is better."
            + (
                " “&lt; s”: already past the limit at the lowest sparsity measured; add lower sparsities to place it."
                if any(knee.below for knee in knees.values())
                else ""
            )
            + (
                " “≥ s”: still within the limit at the highest sparsity measured."
                if any(knee.beyond for knee in knees.values())
                else ""
            )
        )
    rows = results.rows()
    best = [row for row in rows if row["best"]]
    if best:
        text = "; ".join(
            f"{_e(row['target'])}: {_e(row['series'])} ({fmt_ppl(row['perplexity'])}"
            + (f", {row['vs_dense']:.2f}× dense)" if row["vs_dense"] else ")")
            for row in best
        )
        items.append(f"Best at each target: {text}.")
    elif len(rows) == 1:
        row = rows[0]
        items.append(
            f"{_e(row['series'])} at {_e(row['target'])}: achieved sparsity {row['sparsity']:.1%}, perplexity "
            f"<b>{fmt_ppl(row['perplexity'])}</b>"
            + (f" ({row['vs_dense']:.2f}× dense)" if row["vs_dense"] else "")
            + f", {row['prune_seconds']:.1f} s of pruning."
        )
    return '<ul class="findings" id="findings">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>" if items else ""


def _protocol(results: Results) -> str:
    s = results.settings
    items = [("model", results.model)]
    for label, key in (
        ("dtype", "dtype"),
        ("calibration", "calibration"),
        ("evaluation", "evaluation"),
        ("shared recipe", "recipe"),
        ("device", "device"),
        ("versions", "versions"),
    ):
        if s.get(key):
            value = s[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items() if v not in (None, [], ""))
            items.append((label, value))
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items) + "</dl>"


PPL_CAPTION = (
    "Perplexity on the evaluation text (log scale; lower is better) against the fraction of weights zeroed. "
    "Every line starts at the dense model (sparsity 0, dotted black line). The green band is the tolerance: "
    "a curve's <b>essential sparsity</b> (star and thin vertical line) is where it leaves the band, i.e. where "
    "its perplexity first exceeds dense + {tol:.0%}, interpolated in log-perplexity between measured points. "
    "Up to there pruning is almost free; beyond it the curve bends up towards the cliff. "
    "Colour = method, dashed = OWL allocation, triangles = DSnoT refinement; diamonds are N:M patterns."
)
OUTLIER_CAPTION = (
    "Top: each decoder layer's outlier ratio in the dense model (the share of its Wanda scores |W|·‖X‖ above "
    "M times their mean, OWL's D_l). Bottom: "
)
ALLOCATION_CAPTION = (
    "the sparsity each layer was given. Uniform allocation is a flat line at the target; OWL (dashed) prunes "
    "outlier-rich layers less and the others more, keeping the same mean."
)
ERROR_CAPTION = (
    "Relative output reconstruction error of each decoder layer, ‖Y_pruned − Y_dense‖² / ‖Y_dense‖², measured on "
    "the calibration inputs as pruning walks through the model (log scale; lower is better): one panel per target with "
    "a line per method, or one panel with a line per target when a single method has data. "
    "Errors grow with sparsity; a layer far above its neighbours, or a method's line far above the others at the "
    "same target, shows where pruning hurts most. Magnitude pruning looks at no data, so it has no such measurement."
)


DIFFICULTY_CAPTION = (
    "Retained accuracy = (pruned acc − chance) / (dense acc − chance) against sparsity, one line per zero-shot "
    "task, one panel per method: 1 (dotted) keeps all of the dense model's skill above chance, 0 (grey) is "
    "chance. Colour runs from the easiest task (dark) to the hardest (light). Error bars: lm-eval's standard "
    "error of the pruned accuracy, divided by (dense − chance). ES = the task's essential sparsity: the highest "
    "swept sparsity up to which retained accuracy stays ≥ {thr:g} (dashed green line) at every swept sparsity."
)


def _difficulty_section(results: Results) -> str:
    """The task-difficulty view: do harder tasks lose more when pruned? (figure, definitions, tables)."""
    from secateurs.analysis.difficulty import RETAINED_THRESHOLD, task_rows

    rows = task_rows(results)
    if not rows:
        return ""
    series = list(dict.fromkeys(name for row in rows for name in row.curves))
    head = (
        "<tr><th class=l>task (easiest first)</th><th>declared difficulty</th><th>choices</th><th>chance</th>"
        "<th>examples</th><th class=l>metric</th><th>dense accuracy</th>"
        + "".join(f"<th>ES {_e(name)}</th>" for name in series)
        + "</tr>"
    )
    body = []
    for row in rows:
        body.append(
            f'<tr data-task="{_e(row.task)}"><td class=l>{_e(row.task)}</td>'
            f"<td>{fmt(row.difficulty, 'g')}</td><td>{fmt(row.choices, 'd')}</td>"
            f'<td title="{_e(row.note)}">{row.chance:.3f}</td><td>{fmt(row.examples, "d")}</td>'
            f"<td class=l>{_e(row.metric)}</td>"
            f"<td>{_pm(row.dense, row.dense_stderr)}</td>"
            + "".join(f"<td>{row.essential[name].label() if row.essential.get(name) else '–'}</td>" for name in series)
            + "</tr>"
        )
    parts = [
        '<section id="difficulty"><h2>Task difficulty</h2>',
        '<p class="lead">Do harder tasks lose more? Small-magnitude weights may look useless for easy tasks yet '
        "carry what hard tasks need (the “Junk DNA” hypothesis, arXiv 2310.02277): if so, the harder the task, "
        "the sooner its accuracy falls towards chance as sparsity grows.</p>",
        _figure(
            plots.difficulty_plot(results, RETAINED_THRESHOLD),
            "retained accuracy against sparsity per task",
            DIFFICULTY_CAPTION.format(thr=RETAINED_THRESHOLD),
            "fig-difficulty",
        ),
        f'<table id="difficulty-table"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>',
        '<p class="muted">Difficulty order: the level declared in the task’s metadata (<code>metadata: '
        "difficulty</code>; 1 = easiest) where there is one, ties broken by dense accuracy; tasks without one "
        "after them, by dense accuracy (lower = harder). Chance: declared in the task’s metadata, else 1/choices "
        "averaged over the documents scored, else 0 (hover the value for its source). "
        f"<b>Essential sparsity (ES)</b>: the highest swept sparsity s such that retained accuracy is ≥ "
        f"{RETAINED_THRESHOLD:g} at s and at every lower swept sparsity; “&lt; s”: already short at the lowest "
        "swept sparsity; “≥ s”: never short. Accuracy is lm-eval’s acc_norm where the task reports it (summed "
        "log-probability of each choice divided by its length in characters), else acc; ± its standard error.</p>",
    ]
    for name in series:
        sparsities = sorted({p.sparsity for row in rows for p in row.curves.get(name, [])})
        head = "<tr><th class=l>task</th>" + "".join(f"<th>{s:g}</th>" for s in sparsities) + "</tr>"
        body = []
        for row in rows:
            by_sparsity = {p.sparsity: p for p in row.curves.get(name, [])}
            cells = []
            for s in sparsities:
                point = by_sparsity.get(s)
                if point is None:
                    cells.append("<td>–</td>")
                    continue
                retained = "" if point.retained is None else f" <span class=muted>({point.retained:.2f})</span>"
                cells.append(f"<td>{_pm(point.accuracy, point.stderr)}{retained}</td>")
            body.append(f"<tr><td class=l>{_e(row.task)}</td>{''.join(cells)}</tr>")
        parts.append(
            f"<h3>{_e(name)}: accuracy ± standard error (retained accuracy) at each sparsity</h3>"
            f'<table class="difficulty-series" data-series="{_e(name)}"><thead>{head}</thead>'
            f"<tbody>{''.join(body)}</tbody></table>"
        )
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _pm(value: float, error: float | None) -> str:
    return f"{value:.3f}" + (f" ± {error:.3f}" if isinstance(error, (int, float)) and math.isfinite(error) else "")


def render_page(results: Results, tolerance: float = DEFAULT_TOLERANCE, note: str | None = None) -> str:
    """The whole page as one string; ``note`` (e.g. that a sweep is incomplete) is shown first, as a warning."""
    sweep = results.kind == "sweep"
    title = results.title or (f"secateurs sweep: {results.model}" if sweep else f"secateurs report: {results.model}")
    n = len(results.cells)
    if sweep:
        lead = (
            f"{n} pruned configuration{'s' * (n != 1)} of one model, each pruned from the same dense weights on the "
            "same calibration windows and scored on the same evaluation windows (protocol at the bottom). "
            "In the table, the lowest perplexity at each target is highlighted."
        )
    else:
        lead = "One pruned model: what each decoder layer was given, and what it cost."
    parts = [
        f"<h1>{_e(title)}</h1>",
        *([f'<p class="warning" id="incomplete"><strong>{_e(note)}</strong></p>'] if note else []),
        f'<p class="lead">{_e(lead)}</p>',
        _findings(results, tolerance),
    ]
    if sweep:
        parts += [
            '<section id="perplexity"><h2>Perplexity vs sparsity</h2>',
            _figure(
                plots.perplexity_plot(results, tolerance),
                "perplexity against sparsity per method",
                PPL_CAPTION.format(tol=tolerance),
                "fig-perplexity",
            ),
            "</section>",
        ]
    parts += ['<section id="table"><h2>Results</h2>', _table(results)]
    parts.append(
        '<p class="muted">target: the sparsity asked for, or an N:M pattern; achieved: zeros over all pruned linears; '
        "× dense: perplexity ratio to the dense model; mean output error: mean over layers of the relative output "
        "reconstruction error (see below).</p></section>"
    )
    if sweep:
        parts.append(_difficulty_section(results))
    if results.outlier_ratios:
        alloc_caption = OUTLIER_CAPTION + ALLOCATION_CAPTION
    else:
        alloc_caption = "The sparsity each decoder layer was given (line) and reached (dots): " + ALLOCATION_CAPTION
    parts += [
        '<section id="layers"><h2>Per layer</h2>',
        _figure(plots.allocation_plot(results), "outlier ratio and sparsity per layer", alloc_caption, "fig-alloc"),
        _figure(plots.error_plot(results), "output reconstruction error per layer", ERROR_CAPTION, "fig-error"),
    ]
    if not sweep and results.cells:
        parts.append(_layer_table(results))
    parts += ["</section>", '<section id="protocol"><h2>Protocol</h2>', _protocol(results), "</section>"]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f'<p class="muted">Written by secateurs on {stamp}.</p>')
    body = "\n".join(p for p in parts if p)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body><main>\n{body}\n</main></body></html>\n"
    )
