"""Pictures of the uncertainty: macro F1 with its interval per row, and the pairwise
differences marked by significance (matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from emoprompt.evaluation.comparisons import FLOOR
from emoprompt.infra.files import atomic_path


def _save(figure: Figure, out: str | Path) -> None:
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=110, metadata={"Software": None})


def forest_plot(
    metrics: Sequence[Mapping[str, Any]],
    floor: float | None = None,
    baseline: float | None = None,
    confidence: float = 0.95,
) -> Figure:
    """One line per run, top to bottom in the given order: macro F1 and its interval;
    the majority-class floor and the baseline as vertical reference lines."""
    names = [f"{m['model']} · {m['strategy']}" for m in metrics]
    values = np.array([m["f1_macro"] for m in metrics])
    low = np.array([m["intervals"]["f1_macro"]["low"] for m in metrics])
    high = np.array([m["intervals"]["f1_macro"]["high"] for m in metrics])
    figure = Figure(figsize=(8.5, 1.2 + 0.45 * len(names)), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    y = np.arange(len(names))[::-1]
    ax.errorbar(values, y, xerr=[values - low, high - values], fmt="o", color="#14c", capsize=4)
    for yi, v, lo, hi in zip(y, values, low, high, strict=True):
        ax.annotate(
            f"{v:.3f} [{lo:.2f}, {hi:.2f}]",
            (hi, yi),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    if floor is not None:
        ax.axvline(floor, color="#c33", linestyle="--", label=f"always Otras ({floor:.3f})")
    if baseline is not None:
        ax.axvline(baseline, color="#393", linestyle=":", label=f"TF-IDF baseline ({baseline:.3f})")
    ax.set_yticks(y, names)
    ax.set_xlim(0, min(1.0, max(high.max(), baseline or 0) + 0.2))
    ax.set_xlabel(f"macro F1 with its {confidence:.0%} bootstrap interval")
    ax.grid(axis="x", alpha=0.3)
    if floor is not None or baseline is not None:
        figure.legend(loc="outside lower center", ncol=2, fontsize=8)
    tweets = metrics[0]["tweets"] if metrics else 0
    ax.set_title(f"Macro F1 per run, {tweets} tweets")
    return figure


def difference_matrix(table: pd.DataFrame) -> Figure:
    """Row minus column macro F1 for every compared pair (the floor left out); a star
    marks a difference significant after Holm's correction."""
    table = table[(table["a"] != FLOOR) & (table["b"] != FLOOR)]
    names = list(dict.fromkeys([*table["a"], *table["b"]]))
    n = len(names)
    values = np.full((n, n), np.nan)
    stars = np.zeros((n, n), dtype=bool)
    for row in table.itertuples(index=False):
        i, j = names.index(row.a), names.index(row.b)
        values[i, j], values[j, i] = row.difference, -row.difference
        stars[i, j] = stars[j, i] = bool(row.significant)
    figure = Figure(figsize=(2.5 + 0.9 * n, 1.8 + 0.8 * n), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    limit = float(np.nanmax(np.abs(values))) if n > 1 and np.isfinite(values).any() else 1.0
    image = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit)
    figure.colorbar(image, ax=ax, shrink=0.8, label="macro F1, row minus column")
    models = {name.split("/", 1)[0] for name in names if name.split("/", 1)[0] != "baseline"}
    short = names if len(models) > 1 else [name.split("/", 1)[-1] for name in names]
    ax.set_xticks(range(n), short, rotation=45, ha="right")
    ax.set_yticks(range(n), short)
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            text = f"{value:+.3f}" + ("*" if stars[i, j] else "")
            dark = abs(value) > limit / 2
            ax.text(
                j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black"
            )
    ax.set_title("Paired macro-F1 differences (* significant after Holm)")
    return figure


def write_significance_figures(
    metrics: Sequence[Mapping[str, Any]],
    table: pd.DataFrame,
    forest_out: str | Path,
    matrix_out: str | Path,
    baseline_name: str | None,
    confidence: float,
) -> None:
    """Both pictures, from the runs' metrics and their comparisons table."""
    floor_rows = table[table["b"] == FLOOR]
    floor = float(floor_rows["macro_f1_b"].iloc[0]) if len(floor_rows) else None
    shown = [m for m in metrics if f"{m['model']}/{m['strategy']}" != baseline_name]
    base = [m for m in metrics if f"{m['model']}/{m['strategy']}" == baseline_name]
    baseline = float(base[0]["f1_macro"]) if base else None
    _save(forest_plot(shown + base, floor, baseline, confidence), forest_out)
    _save(difference_matrix(table), matrix_out)
