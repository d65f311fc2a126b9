"""Scores of one (model, strategy) run, from its predictions file.

Pure functions over DataFrames (scikit-learn underneath). Every score is over the fixed
seven-label list of :data:`emoprompt.labels.LABELS`: a class that is never predicted,
or absent from the gold labels, still counts in the macro average (with an F1 of 0 —
``zero_division=0``), so runs on different samples are averaged over the same classes.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from emoprompt.evaluation.predictions import read_predictions
from emoprompt.evaluation.statistics import StatisticsSettings, score_intervals
from emoprompt.infra.files import write_json
from emoprompt.labels import LABELS


def check_labels(predictions: pd.DataFrame, labels: Sequence[str] = LABELS) -> None:
    """Refuse a predictions frame that is empty or holds a label outside ``labels``."""
    missing = [c for c in ("gold", "predicted") if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions lack the column(s) {', '.join(missing)}")
    if predictions.empty:
        raise ValueError("no predictions to score")
    for column in ("gold", "predicted"):
        unknown = sorted(set(predictions[column].astype(str)) - set(labels))
        if unknown:
            raise ValueError(
                f"{column} holds label(s) outside the {len(labels)} classes: "
                f"{', '.join(map(repr, unknown))}"
            )


def confusion(predictions: pd.DataFrame, labels: Sequence[str] = LABELS) -> np.ndarray:
    """Counts: rows are the gold labels, columns the predicted ones, in ``labels`` order."""
    check_labels(predictions, labels)
    return confusion_matrix(predictions["gold"], predictions["predicted"], labels=list(labels))


def row_normalise(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its total (the recall of each gold class on the diagonal).

    A gold class with no tweets gives a row of zeros, not a division by zero.
    """
    matrix = np.asarray(matrix, dtype=float)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def unparsed_count(predictions: pd.DataFrame) -> int:
    """Answers in which no label was found (they were given the fallback label)."""
    if "parsed" not in predictions.columns:
        return 0
    parsed = predictions["parsed"]
    if parsed.dtype != bool:
        parsed = parsed.astype(str).str.strip().str.lower() == "true"
    return int((~parsed).sum())


def compute_metrics(
    predictions: pd.DataFrame,
    metadata: Mapping[str, Any] | None = None,
    labels: Sequence[str] = LABELS,
    statistics: StatisticsSettings | None = None,
) -> dict[str, Any]:
    """Every score of one run: macro/weighted F1, accuracy, per-class P/R/F1, unparsed rate.

    ``metadata`` (the prediction job's JSON) supplies what the predictions do not hold:
    the run's speed (``seconds``, ``tweets_per_s``) and its model, strategy and method.
    With ``statistics``, ``intervals`` holds each score's bootstrap interval
    (:func:`emoprompt.evaluation.statistics.score_intervals`).
    """
    metadata = metadata or {}
    labels = list(labels)
    check_labels(predictions, labels)
    gold, predicted = predictions["gold"].astype(str), predictions["predicted"].astype(str)
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, predicted, labels=labels, zero_division=0
    )
    matrix = confusion_matrix(gold, predicted, labels=labels)
    tweets = len(predictions)
    unparsed = unparsed_count(predictions)
    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
            "predicted": int(matrix[:, i].sum()),
        }
        for i, label in enumerate(labels)
    }
    speed = metadata.get("tweets_per_s")
    return {
        "model": metadata.get("model"),
        "strategy": metadata.get("strategy"),
        "method": metadata.get("method"),
        "labels": labels,
        "tweets": tweets,
        "unparsed": unparsed,
        "unparsed_rate": unparsed / tweets,
        "truncated": int(predictions["truncated"].sum()) if "truncated" in predictions else 0,
        "accuracy": float(accuracy_score(gold, predicted)),
        "f1_macro": float(
            f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)
        ),
        "f1_weighted": float(
            f1_score(gold, predicted, labels=labels, average="weighted", zero_division=0)
        ),
        "precision_macro": float(np.mean(precision)),
        "recall_macro": float(np.mean(recall)),
        "per_class": per_class,
        "confusion": matrix.tolist(),
        "seconds": metadata.get("seconds"),
        "tweets_per_s": float(speed) if speed is not None else None,
        # a tuned run's score on the validation split (the probe's, the adapter's, a
        # prompt family's chosen variant's)
        "validation": metadata.get("validation"),
        "prompt_choice": metadata.get("prompt_choice"),
        **(_intervals(gold, predicted, labels, statistics) if statistics else {}),
    }


def _intervals(gold, predicted, labels, statistics: StatisticsSettings) -> dict[str, Any]:
    return {
        "intervals": score_intervals(gold.tolist(), predicted.tolist(), statistics, labels),
        "statistics": statistics.record(),
    }


def ascii_name(text: str) -> str:
    """``text`` without accents, for names that must stay ASCII (``Alegría`` -> ``Alegria``)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return decomposed.encode("ascii", "ignore").decode("ascii")


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scores as one flat name -> number mapping (names ASCII, e.g. ``f1_Alegria``).

    Names hold only letters, digits and underscores so that any tracking back end and
    its UI accept and chart them; values that are unknown (no speed recorded) are left out.
    """
    flat: dict[str, float] = {}
    for name in (
        "f1_macro",
        "f1_weighted",
        "accuracy",
        "precision_macro",
        "recall_macro",
        "unparsed_rate",
        "unparsed",
        "truncated",
        "tweets",
        "tweets_per_s",
        "seconds",
    ):
        value = metrics.get(name)
        if value is not None:
            flat[name] = float(value)
    for label, scores in metrics["per_class"].items():
        for score in ("precision", "recall", "f1", "support"):
            flat[f"{score}_{ascii_name(label)}"] = float(scores[score])
    for name, interval in (metrics.get("intervals") or {}).items():
        flat[f"{ascii_name(name)}_ci_low"] = float(interval["low"])
        flat[f"{ascii_name(name)}_ci_high"] = float(interval["high"])
    validation = metrics.get("validation") or {}
    for name in ("f1_macro", "accuracy"):  # a tuned run's score on the validation split
        if name in validation:
            for key in ("value", "low", "high"):
                suffix = "" if key == "value" else f"_ci_{key}"
                flat[f"validation_{name}{suffix}"] = float(validation[name][key])
    return flat


def read_metadata(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_metrics(
    predictions_path: str | Path,
    metadata_path: str | Path | None,
    out: str | Path,
    *,
    model: str | None = None,
    strategy: str | None = None,
    statistics: StatisticsSettings | None = None,
) -> dict[str, Any]:
    """Score a predictions TSV (with its metadata JSON) and write the metrics JSON."""
    metadata = read_metadata(metadata_path) if metadata_path else {}
    predictions = read_predictions(str(predictions_path))
    metrics = compute_metrics(predictions, metadata, statistics=statistics)
    if model is not None:
        metrics["model"] = model
    if strategy is not None:
        metrics["strategy"] = strategy
    write_json(out, metrics)
    return metrics


def validation_summary(
    gold: Sequence[str],
    predicted: Sequence[str],
    statistics: StatisticsSettings | None = None,
    labels: Sequence[str] = LABELS,
) -> dict[str, Any]:
    """A tuned choice's score on the validation split: macro F1 and accuracy, each with
    its bootstrap interval (the default statistics settings unless given)."""
    statistics = statistics or StatisticsSettings()
    intervals = score_intervals(list(gold), list(predicted), statistics, labels)
    return {
        "split": "validation",
        "tweets": len(gold),
        **{
            name: {key: round(intervals[name][key], 4) for key in ("value", "low", "high")}
            for name in ("f1_macro", "accuracy")
        },
        "statistics": statistics.record(),
    }
