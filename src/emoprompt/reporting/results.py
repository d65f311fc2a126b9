"""The study's figures and its results table.

Confusion matrices are drawn with matplotlib's Agg canvas (no display, no pyplot state);
the table has one row per (model, experiment), in the course notebook's order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from emoprompt.evaluation.metrics import row_normalise
from emoprompt.evaluation.strategies import BASELINE_MODEL, STRATEGIES
from emoprompt.infra.files import atomic_open, atomic_path
from emoprompt.labels import LABELS

# The notebook's columns first, then the others.
TABLE_COLUMNS: tuple[str, ...] = (
    "model",
    "experiment",
    "F1 macro",
    "F1 Alegría",
    "F1 Tristeza",
    "F1 Otras",
    "accuracy",
    "F1 weighted",
    "unparsed %",
    "tweets/s",
    "validation F1 macro",
    "prompt",
)
# Each run's bootstrap interval, where its metrics have one: extra CSV columns, and in
# Markdown beside the score as "0.253 [0.180, 0.330]".
INTERVAL_COLUMNS: dict[str, str] = {"F1 macro": "f1_macro", "accuracy": "accuracy"}
# The notebook's five experiments, then the added ones (the baseline last): the order
# of STRATEGIES.
EXPERIMENT_ORDER: tuple[str, ...] = tuple(STRATEGIES)
# How each column is printed in the Markdown table.
_MARKDOWN_FORMATS = {
    "F1 macro": "{:.3f}",
    "F1 Alegría": "{:.3f}",
    "F1 Tristeza": "{:.3f}",
    "F1 Otras": "{:.3f}",
    "accuracy": "{:.3f}",
    "F1 weighted": "{:.3f}",
    "unparsed %": "{:.1f}",
    "tweets/s": "{:.2f}",
    "validation F1 macro": "{:.3f}",
}


def _rank(value: str, order: Sequence[str]) -> tuple[int, str]:
    """Position in ``order``; anything not in it comes after, alphabetically."""
    return (order.index(value), "") if value in order else (len(order), value)


def results_table(
    metrics: Iterable[Mapping[str, Any]], model_order: Sequence[str] = ()
) -> pd.DataFrame:
    """One row per (model, experiment) from metrics dicts (see ``compute_metrics``).

    Rows follow the notebook's experiments (zero-shot generate, zero-shot first token,
    few-shot generate, few-shot first token, fine-tuned first token), then the added
    strategies, the TF-IDF baseline last; within an experiment, models follow
    ``model_order`` (the baseline model last, unknown models alphabetically after).
    """
    models = [m for m in model_order if m != BASELINE_MODEL] + [BASELINE_MODEL]
    rows = []
    for m in metrics:
        per_class = m["per_class"]
        speed = m.get("tweets_per_s")
        rows.append(
            {
                "model": m["model"],
                "experiment": m["strategy"],
                "F1 macro": m["f1_macro"],
                "F1 Alegría": per_class["Alegría"]["f1"],
                "F1 Tristeza": per_class["Tristeza"]["f1"],
                "F1 Otras": per_class["Otras"]["f1"],
                "accuracy": m["accuracy"],
                "F1 weighted": m["f1_weighted"],
                "unparsed %": 100.0 * m["unparsed_rate"],
                "tweets/s": float(speed) if speed is not None else math.nan,
                **_validation_cells(m.get("validation")),
                "prompt": prompt_cell(m.get("prompt_choice")),
                **_interval_cells(m),
            }
        )
    rows.sort(key=lambda r: (_rank(r["experiment"], EXPERIMENT_ORDER), _rank(r["model"], models)))
    extra = [c for c in _interval_names() if any(c in r for r in rows)]
    return pd.DataFrame(rows, columns=[*TABLE_COLUMNS, *extra])


def prompt_cell(choice: Mapping[str, Any] | None) -> str:
    """Which prompt a row used: a family's variant chosen on validation (blank: the
    prompt file's own prompt, or no prompt)."""
    if not choice:
        return ""
    return f"chosen on validation: {choice['variant']} of {choice['of']} ({choice['label']})"


def _interval_names() -> list[str]:
    columns = [*INTERVAL_COLUMNS, "validation F1 macro"]
    return [f"{column} {end}" for column in columns for end in ("low", "high")]


def _validation_cells(validation: Mapping[str, Any] | None) -> dict[str, float]:
    """A tuned run's validation macro F1 and its interval (blank for the others)."""
    if not validation:
        return {"validation F1 macro": math.nan}
    f1 = validation["f1_macro"]
    return {
        "validation F1 macro": f1["value"],
        "validation F1 macro low": f1["low"],
        "validation F1 macro high": f1["high"],
    }


def _interval_cells(metrics: Mapping[str, Any]) -> dict[str, float]:
    intervals = metrics.get("intervals") or {}
    cells = {}
    for column, name in INTERVAL_COLUMNS.items():
        if name in intervals:
            cells[f"{column} low"] = intervals[name]["low"]
            cells[f"{column} high"] = intervals[name]["high"]
    return cells


def table_markdown(table: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """The table as GitHub-flavoured Markdown (numbers right-aligned, unknowns blank), a
    score with its interval as ``value [low, high]``; ``notes`` follow as paragraphs."""
    columns = [c for c in table.columns if c not in _interval_names()]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if c in _MARKDOWN_FORMATS else "---" for c in columns) + "|",
    ]
    for _, row in table.iterrows():
        cells = []
        for column in columns:
            value = row[column]
            if column in _MARKDOWN_FORMATS:
                value = "" if pd.isna(value) else _MARKDOWN_FORMATS[column].format(value)
                low, high = row.get(f"{column} low"), row.get(f"{column} high")
                if value and low is not None and not pd.isna(low):
                    value += f" [{low:.3f}, {high:.3f}]"
            cells.append(str(value).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    for note in notes:
        text += "\n" + note + "\n"
    return text


def write_table(
    table: pd.DataFrame, md_path: str | Path, csv_path: str | Path, notes: Sequence[str] = ()
) -> None:
    """Write the table as Markdown (with ``notes`` below it) and as CSV (4 decimals; an
    unknown speed left empty)."""
    with atomic_open(md_path) as handle:
        handle.write(table_markdown(table, notes))
    with atomic_open(csv_path, newline="") as handle:
        table.round(4).to_csv(handle, index=False, lineterminator="\n")


def plot_confusion(
    matrix: np.ndarray | Sequence[Sequence[int]],
    labels: Sequence[str] = LABELS,
    title: str = "",
) -> Figure:
    """Two panels: the counts, and the rows normalised (each gold class sums to 1)."""
    counts = np.asarray(matrix, dtype=int)
    rates = row_normalise(counts)
    figure = Figure(figsize=(13, 5.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    panels = (
        (axes[0], counts, "Counts", "{:d}", counts.max() or 1),
        (axes[1], rates, "Row-normalised (recall on the diagonal)", "{:.2f}", 1.0),
    )
    for ax, values, subtitle, fmt, vmax in panels:
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
        figure.colorbar(image, ax=ax, shrink=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("Gold")
        ax.set_title(subtitle)
        for (i, j), value in np.ndenumerate(values):
            dark = value > vmax / 2
            ax.text(
                j,
                i,
                fmt.format(value.item()),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else "black",
            )
    if title:
        figure.suptitle(title)
    return figure


def write_confusion_figure(
    matrix: np.ndarray | Sequence[Sequence[int]],
    out: str | Path,
    labels: Sequence[str] = LABELS,
    title: str = "",
) -> None:
    """Draw :func:`plot_confusion` into a PNG at ``out`` (atomically)."""
    figure = plot_confusion(matrix, labels, title)
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=110, metadata={"Software": None})


def confusion_title(metrics: Mapping[str, Any]) -> str:
    return (
        f"{metrics['model']} · {metrics['strategy']} — macro F1 {metrics['f1_macro']:.3f}, "
        f"accuracy {metrics['accuracy']:.3f}, {metrics['tweets']} tweets"
    )


def write_results_table(
    metrics_paths: Iterable[str | Path],
    md_path: str | Path,
    csv_path: str | Path,
    model_order: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> pd.DataFrame:
    """Read metrics JSON files, build the results table and write it as Markdown and CSV."""
    from emoprompt.evaluation.metrics import read_metadata

    table = results_table([read_metadata(p) for p in metrics_paths], model_order)
    write_table(table, md_path, csv_path, notes)
    return table
