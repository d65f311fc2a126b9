"""Prediction files: per-tweet predictions (TSV) and the run's record (JSON).

The TSV has one row per tweet: id, gold, predicted, parsed, raw answer, truncated (the
tweet was cut to fit the model's context), and a probability per class (``p_<label>``,
empty for generated answers); the JSON records what ran (model, strategy, prompt,
decoding, speed, versions). Both are written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from emoprompt.infra.files import atomic_open, write_json
from emoprompt.infra.provenance import library_versions
from emoprompt.labels import LABELS


@dataclass
class Result:
    predictions: pd.DataFrame
    metadata: dict[str, Any]


def score_columns(labels: Sequence[str] = LABELS) -> list[str]:
    return [f"p_{label}" for label in labels]


def timing_record(tweets: int, seconds: float) -> dict[str, Any]:
    """The fields every run record ends with: tweets, seconds, rate, library versions."""
    return {
        "tweets": tweets,
        "seconds": round(seconds, 3),
        "tweets_per_s": round(tweets / seconds, 4) if seconds > 0 else None,
        "versions": library_versions(),
    }


def predictions_frame(
    sample: pd.DataFrame,
    predicted: Sequence[str],
    parsed: Sequence[bool] | bool,
    raw,
    truncated: Sequence[bool] | bool = False,
) -> pd.DataFrame:
    """The per-tweet columns before the scores: id, gold, predicted, parsed, raw, and
    whether the tweet was cut to fit the model's context."""
    return pd.DataFrame(
        {
            "id": sample["id"].tolist(),
            "gold": sample["label"].tolist(),
            "predicted": list(predicted),
            "parsed": parsed,
            "raw": raw,
            "truncated": truncated if isinstance(truncated, bool) else list(truncated),
        }
    )


def write_result(result: Result, tsv_path: str, json_path: str) -> None:
    """Write the per-tweet predictions (TSV) and the run's metadata (JSON), atomically."""
    write_predictions(result.predictions, tsv_path)
    write_json(json_path, result.metadata)


def write_predictions(frame: pd.DataFrame, path: str) -> None:
    """A predictions TSV, atomically (what :func:`read_predictions` reads)."""
    with atomic_open(path, newline="") as handle:
        frame.to_csv(handle, sep="\t", index=False, lineterminator="\n", float_format="%.6g")


def read_predictions(path: str) -> pd.DataFrame:
    """Read a predictions TSV written by :func:`write_result`."""
    frame = pd.read_csv(
        path,
        sep="\t",
        dtype={"id": str, "raw": str},
        keep_default_na=False,
        na_values={c: [""] for c in score_columns()},
    )
    frame["parsed"] = frame["parsed"].astype(str).str.lower() == "true"
    if "truncated" in frame.columns:  # files written before tweets were cut to fit
        frame["truncated"] = frame["truncated"].astype(str).str.lower() == "true"
    else:
        frame["truncated"] = False
    return frame
