"""How much the prompt decides: the spread of a strategy's score over its prompt family.

Per (model, strategy) that ran a family: every variant's macro F1 on the evaluation
sample (min, median, max, spread; MaxP and AvgP, the best and the mean over prompts as
Mizrahi et al. 2024 propose), the variant chosen on validation with its bootstrap
interval and its rank among the variants, the file's own prompt, and the spread beside
the interval's width: a spread wider than the interval says the prompt moves the score
more than the choice of tweets does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import f1_score

from emoprompt.evaluation.comparisons import FLOOR_LABEL
from emoprompt.evaluation.selection import variant_scores
from emoprompt.infra.files import atomic_open, atomic_path
from emoprompt.labels import LABELS

COLUMNS = [
    "model",
    "strategy",
    "variants",
    "min",
    "median",
    "max",
    "spread",
    "MaxP",
    "AvgP",
    "file's prompt",
    "chosen",
    "chosen variant",
    "validation F1 macro",
    "chosen F1 macro",
    "chosen low",
    "chosen high",
    "chosen rank",
    "interval width",
    "spread / width",
]


def floor_f1(gold: Sequence[str]) -> float:
    """Macro F1 of answering the largest class (Otras) to every tweet."""
    return float(
        f1_score(
            list(gold),
            [FLOOR_LABEL] * len(gold),
            labels=list(LABELS),
            average="macro",
            zero_division=0,
        )
    )


def sensitivity_row(
    model: str, strategy: str, scores: pd.Series, choice: Mapping[str, Any], metrics: Mapping
) -> dict[str, Any]:
    """One (model, strategy)'s spread over its variants (``scores``: test macro F1 by
    variant, in the family's order) and its chosen variant."""
    chosen = choice["chosen"]
    interval = metrics["intervals"]["f1_macro"]
    width = interval["high"] - interval["low"]
    spread = float(scores.max() - scores.min())
    return {
        "model": model,
        "strategy": strategy,
        "variants": len(scores),
        "min": float(scores.min()),
        "median": float(scores.median()),
        "max": float(scores.max()),
        "spread": spread,
        "MaxP": float(scores.max()),
        "AvgP": float(scores.mean()),
        "file's prompt": float(scores.iloc[0]),
        "chosen": chosen,
        "chosen variant": choice["label"],
        "validation F1 macro": choice["validation"]["f1_macro"]["value"],
        "chosen F1 macro": float(metrics["f1_macro"]),
        "chosen low": interval["low"],
        "chosen high": interval["high"],
        # 1 is the best on the evaluation sample; ties share the better rank
        "chosen rank": int((scores > scores[chosen] + 1e-12).sum()) + 1,
        "interval width": width,
        "spread / width": spread / width if width > 0 else float("nan"),
    }


def sensitivity_markdown(table: pd.DataFrame, floor: float, baseline: float | None) -> str:
    """The table as Markdown, with what it shows and how to read it."""
    lines = [
        "# How much the prompt decides",
        "",
        "Macro F1 on the evaluation sample of every variant of each strategy's prompt "
        "family; the chosen variant was chosen on the validation sample alone (its rank is "
        "among the variants on the evaluation sample, 1 the best). *spread / width* compares "
        "the spread over prompts with the width of the chosen variant's bootstrap interval "
        "(resampling tweets): above 1, the prompt moves the score more than the sample of "
        "tweets does.",
        "",
        "| model | strategy | variants | min | median | max | spread | AvgP | file's prompt "
        "| chosen (on validation) | validation F1 | chosen F1 macro | rank | spread / width |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in table.to_dict("records"):
        own = row["file's prompt"]
        lines.append(
            f"| {row['model']} | {row['strategy']} | {row['variants']} | {row['min']:.3f} "
            f"| {row['median']:.3f} | {row['max']:.3f} | {row['spread']:.3f} "
            f"| {row['AvgP']:.3f} | {own:.3f} "
            f"| {row['chosen']}: {row['chosen variant']} | {row['validation F1 macro']:.3f} "
            f"| {row['chosen F1 macro']:.3f} [{row['chosen low']:.3f}, {row['chosen high']:.3f}] "
            f"| {row['chosen rank']} of {row['variants']} | {row['spread / width']:.2f} |"
        )
    lines += ["", f"Floor (every answer {FLOOR_LABEL}): macro F1 {floor:.3f}."]
    if baseline is not None:
        lines.append(f"TF-IDF baseline: macro F1 {baseline:.3f}.")
    lines += ["", "MaxP is the max column, the best over prompts (Mizrahi et al. 2024).", ""]
    return "\n".join(lines)


def sensitivity_figure(
    points: Sequence[tuple[str, pd.Series, str, Mapping[str, float]]],
    floor: float,
    baseline: float | None,
) -> Figure:
    """Each variant a point per (model, strategy), the chosen one marked with its
    interval, the file's own prompt as a square; floor and baseline as lines."""
    figure = Figure(figsize=(8, 1.2 + 0.6 * len(points)))
    ax = figure.add_subplot()
    rng = np.random.default_rng(0)  # vertical jitter, so equal scores stay visible
    for y, (_name, scores, chosen, interval) in enumerate(points):
        jitter = rng.uniform(-0.15, 0.15, len(scores))
        ax.scatter(
            scores, y + jitter, s=14, color="#888", alpha=0.7, label="variant" if not y else None
        )
        ax.scatter(
            [scores.iloc[0]],
            [y],
            marker="s",
            facecolors="none",
            edgecolors="#246",
            s=50,
            label="file's prompt" if not y else None,
        )
        ax.errorbar(
            [scores[chosen]],
            [y],
            xerr=[[scores[chosen] - interval["low"]], [interval["high"] - scores[chosen]]],
            fmt="*",
            color="#c30",
            markersize=12,
            capsize=3,
            label="chosen on validation (95% interval)" if not y else None,
        )
    ax.axvline(floor, color="#c33", linestyle="--", label=f"always {FLOOR_LABEL} ({floor:.3f})")
    if baseline is not None:
        ax.axvline(baseline, color="#393", linestyle=":", label=f"TF-IDF ({baseline:.3f})")
    ax.set_yticks(range(len(points)), [p[0] for p in points])
    ax.invert_yaxis()
    ax.set_xlabel("macro F1 on the evaluation sample")
    ax.set_title("Every prompt variant of each strategy")
    ax.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    return figure


def write_sensitivity(
    pairs: Sequence[Sequence[str]],
    tests: Sequence[pd.DataFrame],
    choices: Sequence[Mapping[str, Any]],
    metrics: Sequence[Mapping[str, Any]],
    baseline: Mapping[str, Any] | None,
    md_out: str,
    csv_out: str,
    figure_out: str,
) -> pd.DataFrame:
    """The spread table (Markdown, CSV) and its figure."""
    rows, points = [], []
    for (model, strategy), test, choice, metric in zip(pairs, tests, choices, metrics, strict=True):
        scores = variant_scores(test).set_index("variant")["f1_macro"]
        rows.append(sensitivity_row(model, strategy, scores, choice, metric))
        interval = metric["intervals"]["f1_macro"]
        points.append((f"{model}\n{strategy}", scores, choice["chosen"], interval))
    table = pd.DataFrame(rows, columns=COLUMNS)
    first = tests[0]
    floor = floor_f1(first[first["variant"] == first["variant"].iloc[0]]["gold"])
    baseline_f1 = float(baseline["f1_macro"]) if baseline else None
    with atomic_open(md_out) as handle:
        handle.write(sensitivity_markdown(table, floor, baseline_f1))
    with atomic_open(csv_out, newline="") as handle:
        table.to_csv(handle, index=False, lineterminator="\n", float_format="%.4f")
    figure = sensitivity_figure(points, floor, baseline_f1)
    with atomic_path(figure_out) as tmp:
        FigureCanvasAgg(figure).print_png(str(tmp))
    return table
