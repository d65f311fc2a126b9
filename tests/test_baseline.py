"""Tests for the TF-IDF + logistic regression baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from emoprompt.evaluation.baseline import predict_proba_frame, train_tfidf_baseline
from emoprompt.labels import LABELS, to_spanish


def read_split(path: Path) -> pd.DataFrame:
    """A real split with the Spanish ``label`` column the product uses."""
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    frame["label"] = frame.pop("emotion").map(to_spanish)
    return frame


@pytest.fixture(scope="module")
def real_run(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train on the real train split, predict the real dev split."""
    train = read_split(data_dir / "train.tsv")
    dev = read_split(data_dir / "dev.tsv")
    assert (len(train), len(dev)) == (5723, 844)
    pipeline = train_tfidf_baseline(train, seed=0)
    return dev, predict_proba_frame(pipeline, dev)


@pytest.mark.slow
def test_macro_f1_on_real_dev(real_run: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    dev, probs = real_run
    score = f1_score(
        dev["label"], probs["predicted"], labels=list(LABELS), average="macro", zero_division=0
    )
    # 0.514 when measured; the margin absorbs library-version drift, not a worse model.
    assert score >= 0.48, f"macro F1 {score:.4f}"


@pytest.mark.slow
def test_frame_shape_on_real_dev(real_run: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    dev, probs = real_run
    assert probs.columns.tolist() == [*LABELS, "predicted"]
    assert probs.index.equals(dev.index)
    values = probs[list(LABELS)].to_numpy()
    np.testing.assert_allclose(values.sum(axis=1), 1.0)
    assert (values > 0).all()  # every class was in train
    assert set(probs["predicted"]) <= set(LABELS)
    # Balanced class weights: the rare classes are predicted too, not only Otras and Alegría.
    assert set(probs["predicted"]) == set(LABELS)


def tiny_split(labels: tuple[str, ...], copies: int = 6) -> pd.DataFrame:
    words = {
        "Alegría": "qué alegría tan grande, feliz",
        "Tristeza": "qué pena, estoy triste",
        "Ira": "qué rabia me da, indignante",
        "Otras": "hoy hay partido a las nueve",
    }
    rows = [
        {
            "id": f"{label}{i}",
            "event": "e",
            "tweet": f"{words[label]} {i}",
            "offensive": "NO",
            "label": label,
        }
        for label in labels
        for i in range(copies)
    ]
    return pd.DataFrame(rows)


def test_labels_absent_from_training_get_zero() -> None:
    train = tiny_split(("Otras", "Alegría", "Ira"))  # not in LABELS order on purpose
    pipeline = train_tfidf_baseline(train)
    test = pd.DataFrame(
        {"tweet": ["qué alegría tan grande", "me da rabia", "partido a las nueve"]},
        index=[10, 20, 30],
    )
    probs = predict_proba_frame(pipeline, test)
    assert probs.columns.tolist() == [*LABELS, "predicted"]
    assert probs.index.tolist() == [10, 20, 30]
    for absent in ("Tristeza", "Desagrado", "Miedo", "Sorpresa"):
        assert (probs[absent] == 0).all()
    np.testing.assert_allclose(probs[list(LABELS)].sum(axis=1), 1.0)
    # The columns follow LABELS, not sklearn's alphabetical classes_.
    assert probs["predicted"].tolist() == ["Alegría", "Ira", "Otras"]
    assert probs.loc[10, "Alegría"] == pytest.approx(
        pipeline.predict_proba(["qué alegría tan grande"])[0][
            list(pipeline.classes_).index("Alegría")
        ]
    )


def test_training_is_deterministic() -> None:
    train = tiny_split(("Alegría", "Tristeza", "Ira", "Otras"))
    test = pd.DataFrame({"tweet": ["estoy triste y con rabia", "qué alegría"]})
    first = predict_proba_frame(train_tfidf_baseline(train, seed=1), test)
    second = predict_proba_frame(train_tfidf_baseline(train, seed=1), test)
    pd.testing.assert_frame_equal(first, second)


def test_unknown_training_label_is_rejected() -> None:
    train = tiny_split(("Alegría", "Otras")).replace({"label": {"Otras": "Neutral"}})
    with pytest.raises(ValueError, match="Neutral"):
        train_tfidf_baseline(train)


class FixedModel:
    """Stands in for a fitted pipeline: fixed probabilities over given classes."""

    def __init__(self, classes: list[str], proba: list[list[float]]) -> None:
        self.classes_ = np.array(classes, dtype=object)
        self._proba = np.array(proba)

    def predict_proba(self, texts: object) -> np.ndarray:
        return self._proba


def test_ties_go_to_the_earlier_label() -> None:
    model = FixedModel(["Otras", "Tristeza", "Alegría"], [[0.4, 0.2, 0.4], [0.1, 0.45, 0.45]])
    probs = predict_proba_frame(model, pd.DataFrame({"tweet": ["a", "b"]}))  # type: ignore[arg-type]
    assert probs["predicted"].tolist() == ["Alegría", "Alegría"]
    assert probs.loc[0, "Otras"] == 0.4 and probs.loc[1, "Tristeza"] == 0.45


def test_pipeline_with_foreign_classes_is_rejected() -> None:
    model = FixedModel(["Neutral", "Alegría"], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="Neutral"):
        predict_proba_frame(model, pd.DataFrame({"tweet": ["a"]}))  # type: ignore[arg-type]
