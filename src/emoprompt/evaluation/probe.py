"""The ``linear_probe`` strategy: logistic regression on the model's hidden states.

It asks the study's question directly: when prompting scores low, is it the prompt
that fails, or does the model not represent the emotion at all? Each tweet (the text
alone, no prompt) goes through the model once; the residual stream after a decoder
layer, pooled over the tweet's tokens (:mod:`emoprompt.inference.hidden`), is the
feature vector of a class-balanced logistic regression fitted on train.

Every tuned choice (layer, pooling, regularisation ``C``) is compared on the validation
split: each candidate is fitted on the training tweets and scored (macro F1) on
validation; the best one, ties to the first listed, scores the evaluation sample. The
test split never takes part in a choice.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from emoprompt.evaluation.baseline import in_label_order
from emoprompt.evaluation.metrics import validation_summary
from emoprompt.evaluation.predictions import (
    Result,
    predictions_frame,
    score_columns,
    timing_record,
)
from emoprompt.inference.hidden import POOLINGS, layer_features
from emoprompt.labels import LABELS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSettings:
    """The ``probe:`` section of the config (candidates are lists)."""

    layers: tuple[int, ...] = (20, 24)
    pooling: tuple[str, ...] = ("mean",)
    C: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    train_size: int | str = 1500
    subset: str = "stratified"
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    autocast: str = "auto"  # bfloat16 matrix products where they pay (as in fine-tuning)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ProbeSettings:
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"probe: unknown setting(s) {', '.join(unknown)}")
        given = dict(values)
        for key in ("layers", "pooling", "C"):
            if key in given:
                value = given[key]
                given[key] = tuple(value) if isinstance(value, list | tuple) else (value,)
        settings = cls(**given)
        bad = sorted(set(settings.pooling) - set(POOLINGS))
        if bad:
            raise ValueError(f"probe.pooling: {bad} not among {', '.join(POOLINGS)}")
        if not settings.layers or not settings.pooling or not settings.C:
            raise ValueError("probe: layers, pooling and C need at least one value each")
        if settings.autocast not in ("auto", "bfloat16", "none"):
            raise ValueError("probe.autocast must be auto, bfloat16 or none")
        if any(c <= 0 for c in settings.C):
            raise ValueError("probe.C: every value must be positive")
        return settings

    def record(self) -> dict[str, Any]:
        values = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _classifier(c: float, seed: int):
    return make_pipeline(
        StandardScaler(),
        LogisticRegression(C=c, class_weight="balanced", max_iter=3000, random_state=seed),
    )


def macro_f1(gold: Sequence[str], predicted: Sequence[str]) -> float:
    """Macro F1 over the seven classes (a class never predicted nor present counts 0)."""
    return float(f1_score(gold, predicted, labels=list(LABELS), average="macro", zero_division=0))


def choose(
    train_x: Mapping[tuple[int, str], np.ndarray],
    train_y: Sequence[str],
    valid_x: Mapping[tuple[int, str], np.ndarray],
    valid_y: Sequence[str],
    settings: ProbeSettings,
) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
    """Fit every candidate on train, score it on validation; the best (ties: the first)."""
    candidates = []
    best, best_model = None, None
    for layer, pooling, c in itertools.product(settings.layers, settings.pooling, settings.C):
        model = _classifier(c, settings.seed).fit(train_x[(layer, pooling)], list(train_y))
        score = macro_f1(valid_y, model.predict(valid_x[(layer, pooling)]))
        row = {"layer": layer, "pooling": pooling, "C": c, "validation_macro_f1": round(score, 4)}
        candidates.append(row)
        log.info(
            "probe layer %d, %s pooling, C=%g: validation macro F1 %.4f", layer, pooling, c, score
        )
        if best is None or score > best["validation_macro_f1"]:
            best, best_model = row, model
    return dict(best), best_model, candidates


def probabilities(model: Any, features: np.ndarray) -> np.ndarray:
    """Class probabilities in ``LABELS`` order (a class absent from training: 0)."""
    return in_label_order(model.classes_, model.predict_proba(features))


def run_probe(
    model: Any,
    tokenizer: Any,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    sample: pd.DataFrame,
    settings: ProbeSettings,
) -> Result:
    """Fit the probe on ``train`` (the training tweets already chosen), choose on
    ``validation``, predict ``sample``."""
    from emoprompt.models.loading import bf16_autocast

    start = time.perf_counter()
    layers = sorted(set(settings.layers))
    device = next(model.parameters()).device.type
    autocast = bf16_autocast(settings.autocast, device)

    def features(frame: pd.DataFrame, name: str):
        return layer_features(
            model,
            tokenizer,
            frame["tweet"].tolist(),
            layers,
            batch_size=settings.batch_size,
            max_length=settings.max_length,
            progress=f"probe features: {name}",
            autocast=autocast,
        )

    train_x, valid_x = features(train, "train"), features(validation, "validation")
    sample_x = features(sample, "sample")
    feature_seconds = time.perf_counter() - start
    chosen, classifier, candidates = choose(
        train_x, train["label"], valid_x, validation["label"], settings
    )
    key = (chosen["layer"], chosen["pooling"])
    validated = validation_summary(validation["label"], classifier.predict(valid_x[key]))
    probs = probabilities(classifier, sample_x[key])
    predicted = [LABELS[i] for i in probs.argmax(axis=1)]
    seconds = time.perf_counter() - start
    frame = predictions_frame(sample, predicted, True, "")
    for j, column in enumerate(score_columns()):
        frame[column] = probs[:, j]
    metadata = {
        "strategy": "linear_probe",
        "method": "probe",
        "description": (
            f"logistic regression on layer {chosen['layer']} hidden states "
            f"({chosen['pooling']} pooling), C={chosen['C']:g}, chosen on validation"
        ),
        "probe": {
            "settings": settings.record(),
            "chosen": chosen,
            "candidates": candidates,
            "train_tweets": len(train),
            "train_class_counts": train["label"].value_counts().to_dict(),
            "validation_tweets": len(validation),
            "feature_seconds": round(feature_seconds, 1),
            "autocast": "bfloat16" if autocast else "none",
        },
        "validation": validated,
        "unparsed": 0,
        **timing_record(len(frame), seconds),
    }
    return Result(frame, metadata)
