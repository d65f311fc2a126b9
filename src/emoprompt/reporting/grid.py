"""Study grids: every (model, strategy) run over several seeds, summarised.

A grid runs each (model, strategy) once per evaluation-sample seed and, for few-shot
strategies, once per few-shot seed as well. The grid table has one row per (model,
strategy): how many runs it had, the mean and standard deviation of each score over
them (``std`` is the sample standard deviation, ddof=1: blank for a single run) and the
t interval of the mean over the seeds (``ci low``/``ci high``, at the configured
confidence). The figure compares the strategies within each model, with the standard
deviation as error bars.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import t as t_distribution

from emoprompt.evaluation.metrics import read_metadata
from emoprompt.infra.files import atomic_open, atomic_path
from emoprompt.reporting.results import TABLE_COLUMNS, results_table

# The scores summarised over seeds: the results table's, without the keys, the speed and
# the validation score (the same for every sample seed).
GRID_SCORES: tuple[str, ...] = tuple(
    c for c in TABLE_COLUMNS[2:] if c not in ("tweets/s", "validation F1 macro", "prompt")
)
_DECIMALS = {"unparsed %": 1}


def grid_table(
    metrics: Iterable[Mapping[str, Any]], model_order: Sequence[str] = (), confidence: float = 0.95
) -> pd.DataFrame:
    """One row per (model, experiment): ``runs``, then ``<score> mean``, ``<score> std``
    and the t interval of the mean over the runs, ``<score> ci low`` / ``ci high``.

    Rows follow the results table's order (experiments as in the notebook, models as in
    ``model_order``, the baseline last).
    """
    runs = results_table(metrics, model_order)
    columns = ["model", "experiment", "runs"]
    for score in GRID_SCORES:
        columns += [f"{score} mean", f"{score} std", f"{score} ci low", f"{score} ci high"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    groups = runs.groupby(["model", "experiment"], sort=False)
    table = groups.size().rename("runs").reset_index()
    for score in GRID_SCORES:
        stats = groups[score].agg(["mean", "std"]).reset_index(drop=True)
        table[f"{score} mean"] = stats["mean"].astype(float)
        table[f"{score} std"] = stats["std"].astype(float)  # ddof=1; NaN for one run
        low, high = mean_interval(
            table[f"{score} mean"], table[f"{score} std"], table["runs"], confidence
        )
        table[f"{score} ci low"], table[f"{score} ci high"] = low, high
    return table[columns]


def mean_interval(mean, std, runs, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """The t interval of a mean over ``runs`` seeds (NaN for a single run)."""
    runs = np.asarray(runs, dtype=float)
    df = np.where(runs > 1, runs - 1, np.nan)
    half = t_distribution.ppf(0.5 + confidence / 2, df) * np.asarray(std) / np.sqrt(runs)
    return np.asarray(mean) - half, np.asarray(mean) + half


def grid_markdown(table: pd.DataFrame) -> str:
    """The grid table as Markdown, each score as ``mean ± std`` (macro F1 also with the
    interval of its mean, ``[low, high]``)."""
    header = ["model", "experiment", "runs", *GRID_SCORES]
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|---|---:|" + "|".join("---:" for _ in GRID_SCORES) + "|",
    ]
    for _, row in table.iterrows():
        cells = [str(row["model"]), str(row["experiment"]), str(int(row["runs"]))]
        for score in GRID_SCORES:
            digits = _DECIMALS.get(score, 3)
            mean, std = row[f"{score} mean"], row[f"{score} std"]
            cell = "" if pd.isna(mean) else f"{mean:.{digits}f}"
            if cell and not pd.isna(std):
                cell += f" ± {std:.{digits}f}"
                if score == "F1 macro":
                    low, high = row[f"{score} ci low"], row[f"{score} ci high"]
                    cell += f" [{low:.{digits}f}, {high:.{digits}f}]"
            cells.append(cell)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_strategies_by_model(table: pd.DataFrame, score: str = "F1 macro") -> Figure:
    """Bars of ``score`` (mean over seeds) per strategy, grouped by model; std as error bars."""
    models = list(dict.fromkeys(table["model"]))
    strategies = list(dict.fromkeys(table["experiment"]))
    palette = colormaps["tab10"]
    figure = Figure(figsize=(max(6.0, 3.0 + 0.5 * len(table)), 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    labelled: set[str] = set()
    width = 0.8 / table.groupby("model").size().max()  # one width for every bar
    for position, model in enumerate(models):
        rows = table[table["model"] == model]
        left = position - width * len(rows) / 2  # the model's bars centred on its tick
        for slot, (_, row) in enumerate(rows.iterrows()):
            strategy = row["experiment"]
            std = row[f"{score} std"]
            ax.bar(
                left + width * (slot + 0.5),
                row[f"{score} mean"],
                width * 0.92,
                yerr=0.0 if pd.isna(std) else std,
                capsize=3,
                color=palette(strategies.index(strategy) % palette.N),
                label=None if strategy in labelled else strategy,
                error_kw={"elinewidth": 1},
            )
            labelled.add(strategy)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel(f"{score} (mean ± std over seeds)")
    top = (table[f"{score} mean"] + table[f"{score} std"].fillna(0)).max()
    ax.set_ylim(0, max(0.05, float(np.nan_to_num(top))) * 1.15)
    ax.set_title(f"{score} by strategy and model")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return figure


def write_grid_outputs(
    metrics_paths: Iterable[str | Path],
    md_path: str | Path,
    csv_path: str | Path,
    figure_path: str | Path,
    model_order: Sequence[str] = (),
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Read every run's metrics JSON; write the grid table (Markdown, CSV) and the figure."""
    table = grid_table([read_metadata(p) for p in metrics_paths], model_order, confidence)
    with atomic_open(md_path) as handle:
        handle.write(grid_markdown(table))
    with atomic_open(csv_path, newline="") as handle:
        table.round(4).to_csv(handle, index=False, lineterminator="\n")
    figure = plot_strategies_by_model(table)
    with atomic_path(figure_path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    return table
