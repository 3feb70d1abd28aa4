"""The figures of a results page, drawn with matplotlib's object API (no pyplot, no global backend) as PNG bytes.

One visual language in every figure: colour = method, line style = allocation (solid uniform, dashed OWL,
dotted a file), marker = refinement (circle none, triangle DSnoT). Each function returns None when the
results hold nothing to draw.
"""

from __future__ import annotations

import io
import math

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, PercentFormatter

from secateurs.analysis.summary import DEFAULT_TOLERANCE, Results, allocation_label, series_label, target_label

METHOD_COLORS = {"magnitude": "#7f7f7f", "wanda": "#1f77b4", "sparsegpt": "#d62728"}
EXTRA_COLORS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
ALLOCATION_STYLES = {"uniform": "-", "owl": "--"}
REFINE_MARKERS = {"none": "o", "dsnot": "^"}
DPI = 100


def series_style(recipe: dict) -> dict:
    """Matplotlib keyword arguments for a series (method, allocation, refinement) of ``recipe``."""
    method = recipe["method"]
    color = METHOD_COLORS.get(method) or EXTRA_COLORS[sum(map(ord, method)) % len(EXTRA_COLORS)]
    allocation = recipe.get("allocation", "uniform")
    return {
        "color": color,
        "linestyle": ALLOCATION_STYLES.get(allocation, ":"),
        "marker": REFINE_MARKERS.get(recipe.get("refine") or "none", "s"),
    }


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def _series_recipes(results: Results) -> dict[str, dict]:
    out = {}
    for cell in results.cells:
        out.setdefault(series_label(cell["recipe"]), cell["recipe"])
    return out


def perplexity_plot(results: Results, tolerance: float = DEFAULT_TOLERANCE) -> bytes | None:
    """Perplexity (log) vs target sparsity per series, from the dense model at 0; knees starred; N:M as diamonds."""
    dense = results.dense
    rows = [r for r in results.rows() if r["perplexity"] is not None and math.isfinite(r["perplexity"])]
    if not dense or not rows:
        return None
    recipes = _series_recipes(results)
    knees = results.knees(tolerance)
    fig = Figure(figsize=(10, 5.2), layout="constrained")
    ax = fig.add_subplot()
    ax.set_yscale("log")
    ax.axhline(dense, color="black", linewidth=1.2, linestyle=":", label=f"dense model ({dense:.4g})")
    threshold = (1 + tolerance) * dense
    ax.axhspan(dense, threshold, color="#2ca02c", alpha=0.08, linewidth=0)
    ax.axhline(threshold, color="#2ca02c", linewidth=0.9, linestyle="--", label=f"knee limit: dense + {tolerance:.0%}")
    for name, points in results.curves().items():
        style = series_style(recipes[name])
        xs, ys = zip(*[(0.0, dense), *[(s, p) for s, p in points if math.isfinite(p)]], strict=True)
        knee = knees[name]
        label = f"{name}: essential sparsity {knee.label()}"
        ax.plot(xs, ys, label=label, linewidth=2, markersize=6, **style)
        if knee.exact:
            ax.plot(knee.sparsity, threshold, marker="*", markersize=16, color=style["color"], markeredgecolor="black")
            ax.axvline(knee.sparsity, color=style["color"], linewidth=0.8, alpha=0.5)
    nm_rows = [r for r in rows if r["pattern"]]
    for row in nm_rows:  # filled for uniform allocation, hollow otherwise
        cell = next(c for c in results.cells if c["key"] == row["key"])
        style = series_style(cell["recipe"])
        uniform = cell["recipe"].get("allocation", "uniform") == "uniform"
        ax.plot(
            row["sparsity_target"],
            row["perplexity"],
            marker="D",
            markersize=8,
            color=style["color"],
            markerfacecolor=style["color"] if uniform else "white",
            markeredgewidth=1.5,
            linestyle="none",
        )
    for pattern in dict.fromkeys(r["target"] for r in nm_rows):  # one label per pattern, beside its highest diamond
        top = max((r for r in nm_rows if r["target"] == pattern), key=lambda r: r["perplexity"])
        ax.annotate(
            pattern, (top["sparsity_target"], top["perplexity"]), xytext=(7, 4), textcoords="offset points", fontsize=9
        )
    if nm_rows:
        ax.plot([], [], marker="D", color="#555", linestyle="none", label="N:M pattern at its sparsity (hollow: OWL)")
    ax.set_xlabel("target sparsity (fraction of weights zeroed in every pruned linear)")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlim(left=-0.01)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", axis="y", alpha=0.1)
    ax.legend(loc="upper left", fontsize=9, framealpha=0.9)
    _plain_log_labels(ax)
    return _png(fig)


def allocation_plot(results: Results) -> bytes | None:
    """Per decoder layer: the dense outlier ratio (bars) and the sparsity each allocation gave it (lines)."""
    schedules: dict[str, tuple[dict, list[float], list[float]]] = {}
    for cell in results.cells:
        recipe, layers = cell["recipe"], cell["report"]["layers"]
        allocation = recipe.get("allocation", "uniform")
        name = f"{target_label(recipe)}, {allocation_label(allocation)}"
        achieved = [_layer_sparsity(layer) for layer in layers]
        schedules.setdefault(name, (recipe, [layer["sparsity_target"] for layer in layers], achieved))
    ratios = results.outlier_ratios
    if not schedules and not ratios:
        return None
    panels = (1 if ratios else 0) + (1 if schedules else 0)
    fig = Figure(figsize=(10, 2.9 * panels + 0.4), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    if ratios:
        ax = axes[0]
        ax.bar(range(len(ratios)), ratios, color="#ff7f0e", alpha=0.8)
        m = results.settings.get("owl_m")
        ax.set_ylabel(f"outlier ratio\n(scores > {m:g} x mean)" if m else "outlier ratio")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
        ax.set_title("outlier ratio D_l of each layer (dense model, calibration text)", fontsize=10, loc="left")
        ax.grid(True, axis="y", alpha=0.3)
    if schedules:
        ax = axes[-1]
        targets = sorted({recipe["sparsity"] for recipe, _, _ in schedules.values()})
        for name, (recipe, layer_targets, achieved) in sorted(schedules.items(), key=lambda kv: kv[1][0]["sparsity"]):
            shade = targets.index(recipe["sparsity"]) / max(len(targets) - 1, 1)
            color = colormaps["viridis"](0.1 + 0.75 * shade)
            style = ALLOCATION_STYLES.get(recipe.get("allocation", "uniform"), ":")
            ax.plot(range(len(layer_targets)), layer_targets, color=color, linestyle=style, linewidth=1.8, label=name)
            if results.kind == "folder":
                ax.plot(range(len(achieved)), achieved, "o", color=color, markersize=4, label="achieved")
        ax.set_ylabel("layer sparsity")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_title("sparsity given to each layer (solid: uniform, dashed: OWL)", fontsize=10, loc="left")
        ax.grid(True, alpha=0.3)
        ax.legend(
            fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="target, allocation", title_fontsize=8
        )
    axes[-1].set_xlabel("decoder layer")
    _layer_ticks(axes[-1], len(ratios) if ratios else len(next(iter(schedules.values()))[1]))
    return _png(fig)


def error_plot(results: Results) -> bytes | None:
    """Per-layer relative output reconstruction error (log): one panel per target with one line per series, or,
    when a single series has errors, one panel with one line per target (coloured by sparsity)."""
    by_target: dict[str, list[dict]] = {}
    for row in results.rows():
        cell = next(c for c in results.cells if c["key"] == row["key"])
        if any(layer.get("output_error") is not None for layer in cell["report"]["layers"]):
            by_target.setdefault(row["target"], []).append(cell)
    if not by_target:
        return None
    series = {series_label(c["recipe"]) for cells in by_target.values() for c in cells}
    if len(series) == 1:
        (name,) = series
        panels = {f"{name}, every target": [c for cells in by_target.values() for c in cells]}
    else:
        panels = {_target_title(t): cells for t, cells in by_target.items()}
    n = len(panels)
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig = Figure(figsize=(10, 2.9 * rows_n + 0.8), layout="constrained")
    axes = fig.subplots(rows_n, cols, sharey=True, squeeze=False)
    handles = {}
    for i, (ax, (title, cells)) in enumerate(zip(axes.flat, panels.items(), strict=False)):
        for j, cell in enumerate(cells):
            layers = [layer for layer in cell["report"]["layers"] if layer.get("output_error") is not None]
            if len(series) == 1:
                style = {"color": colormaps["viridis"](0.1 + 0.75 * j / max(len(cells) - 1, 1)), "marker": "o"}
                label = _target_title(target_label(cell["recipe"]))
            else:
                style, label = series_style(cell["recipe"]), series_label(cell["recipe"])
            (line,) = ax.plot(
                [layer["index"] for layer in layers],
                [max(layer["output_error"], 1e-12) for layer in layers],
                linewidth=1.5,
                markersize=3.5,
                **style,
            )
            handles.setdefault(label, line)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("relative output error")
        if i + cols >= n:  # nothing below it
            ax.set_xlabel("decoder layer")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    _plain_log_labels(axes.flat[0])
    fig.legend(
        list(handles.values()), list(handles.keys()), loc="outside lower center", ncol=min(len(handles), 5), fontsize=9
    )
    return _png(fig)


def _target_title(target: str) -> str:
    return f"target {target}" if ":" in target else f"target sparsity {float(target):.0%}"


def _plain_log_labels(ax) -> None:
    """Label a log y axis with plain numbers (300, 0.02), minor ticks too when it spans less than 20x."""
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 100 else f"{v:.3g}")
    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if high / low < 20 else NullFormatter())


def _layer_sparsity(layer: dict) -> float:
    numel = sum(lin["numel"] for lin in layer["linears"])
    return sum(lin["zeros"] for lin in layer["linears"]) / numel if numel else 0.0


def _layer_ticks(ax, count: int) -> None:
    step = max(1, math.ceil(count / 30))
    ax.set_xticks(range(0, count, step))
    ax.set_xlim(-0.6, count - 0.4)


def difficulty_plot(results: Results, threshold: float | None = None) -> bytes | None:
    """Retained accuracy vs sparsity, one line per task (colour: easiest dark to hardest light), one panel per
    series; error bars are lm-eval's standard error scaled by (dense − chance)."""
    from secateurs.analysis.difficulty import RETAINED_THRESHOLD, task_rows

    threshold = RETAINED_THRESHOLD if threshold is None else threshold
    rows = [row for row in task_rows(results, threshold) if row.curves]
    series = list(dict.fromkeys(name for name in results.curves() for row in rows if name in row.curves))
    if not rows or not series:
        return None
    cols = min(len(series), 3)
    lines = math.ceil(len(series) / cols)
    fig = Figure(figsize=(4.6 * cols + 0.6, 4.4 * lines + 0.4), layout="constrained")
    axes = fig.subplots(lines, cols, sharey=True, squeeze=False).ravel()
    colors = colormaps["plasma"]
    for ax, name in zip(axes, series, strict=False):
        ax.axhline(1.0, color="black", linewidth=1, linestyle=":")
        ax.axhline(threshold, color="#2ca02c", linewidth=0.9, linestyle="--")
        ax.axhline(0.0, color="#999999", linewidth=0.9)
        for i, row in enumerate(rows):
            points = [p for p in row.curves.get(name, []) if p.retained is not None]
            if not points:
                continue
            scale = row.dense - row.chance
            xs = [0.0, *(p.sparsity for p in points)]
            ys = [1.0, *(p.retained for p in points)]
            errors = [0.0, *((p.stderr or 0.0) / scale for p in points)]
            essential = row.essential.get(name)
            label = f"{row.task} ({row.order_label}): ES {essential.label() if essential else '–'}"
            ax.errorbar(
                xs,
                ys,
                yerr=errors,
                color=colors(0.85 * i / max(len(rows) - 1, 1)),
                marker="o",
                markersize=4,
                linewidth=1.6,
                capsize=2,
                label=label,
            )
        ax.set_title(name)
        ax.set_xlabel("sparsity (0 = dense)")
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower left")
    for ax in axes[len(series) :]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel("retained accuracy  (acc − chance) / (dense − chance)")
    return _png(fig)
