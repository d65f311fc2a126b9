"""Metrics of hand-made predictions against scikit-learn, and the results table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from emoprompt.evaluation.metrics import (
    ascii_name,
    compute_metrics,
    confusion,
    flat_metrics,
    row_normalise,
    write_metrics,
)
from emoprompt.evaluation.predictions import Result, score_columns, write_result
from emoprompt.evaluation.strategies import STRATEGIES
from emoprompt.labels import LABELS
from emoprompt.reporting.results import (
    TABLE_COLUMNS,
    results_table,
    table_markdown,
    write_confusion_figure,
    write_table,
)

ALE, TRI, DES, IRA, MIE, SOR, OTR = LABELS  # Alegría Tristeza Desagrado Ira Miedo Sorpresa Otras


def predictions(gold, predicted, parsed=None) -> pd.DataFrame:
    parsed = [True] * len(gold) if parsed is None else parsed
    return pd.DataFrame(
        {
            "id": [str(i) for i in range(len(gold))],
            "gold": gold,
            "predicted": predicted,
            "parsed": parsed,
            "raw": [""] * len(gold),
        }
    )


def assert_matches_sklearn(frame: pd.DataFrame, metrics: dict) -> None:
    gold, pred, labels = frame["gold"], frame["predicted"], list(LABELS)
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        scores = metrics["per_class"][label]
        assert scores["precision"] == pytest.approx(p[i])
        assert scores["recall"] == pytest.approx(r[i])
        assert scores["f1"] == pytest.approx(f[i])
        assert scores["support"] == s[i]
    macro = f1_score(gold, pred, labels=labels, average="macro", zero_division=0)
    weighted = f1_score(gold, pred, labels=labels, average="weighted", zero_division=0)
    assert metrics["f1_macro"] == pytest.approx(macro)
    assert metrics["f1_macro"] == pytest.approx(np.mean(f))  # over all seven classes
    assert metrics["f1_weighted"] == pytest.approx(weighted)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert metrics["confusion"] == confusion_matrix(gold, pred, labels=labels).tolist()
    assert metrics["tweets"] == len(frame)


# Miedo is in the gold labels but never predicted; Sorpresa is predicted but never gold;
# Desagrado is neither: all three still count (as 0) in the macro average.
MIXED = predictions(
    gold=[ALE, ALE, ALE, TRI, TRI, IRA, MIE, MIE, OTR, OTR, OTR, OTR],
    predicted=[ALE, ALE, OTR, TRI, SOR, IRA, OTR, ALE, OTR, OTR, SOR, TRI],
    parsed=[True, True, False, True, True, True, False, True, True, True, True, True],
)


def test_mixed_predictions_match_sklearn() -> None:
    metrics = compute_metrics(MIXED)
    assert_matches_sklearn(MIXED, metrics)
    assert metrics["labels"] == list(LABELS)


def test_class_never_predicted_counts_as_zero() -> None:
    metrics = compute_metrics(MIXED)
    miedo = metrics["per_class"][MIE]
    assert (miedo["support"], miedo["predicted"]) == (2, 0)
    assert miedo["precision"] == miedo["recall"] == miedo["f1"] == 0.0


def test_class_absent_from_gold_counts_as_zero() -> None:
    metrics = compute_metrics(MIXED)
    sorpresa, desagrado = metrics["per_class"][SOR], metrics["per_class"][DES]
    assert (sorpresa["support"], sorpresa["predicted"]) == (0, 2)
    assert sorpresa["f1"] == 0.0
    assert (desagrado["support"], desagrado["predicted"], desagrado["f1"]) == (0, 0, 0.0)
    present = [metrics["per_class"][label]["f1"] for label in (ALE, TRI, IRA, OTR)]
    assert metrics["f1_macro"] == pytest.approx(sum(present) / 7)


def test_unparsed_rate() -> None:
    metrics = compute_metrics(MIXED)
    assert metrics["unparsed"] == 2
    assert metrics["unparsed_rate"] == pytest.approx(2 / 12)


def test_all_correct() -> None:
    every = predictions(list(LABELS) * 2, list(LABELS) * 2)
    metrics = compute_metrics(every, {"tweets_per_s": 12.5})
    assert_matches_sklearn(every, metrics)
    assert metrics["f1_macro"] == metrics["accuracy"] == metrics["f1_weighted"] == 1.0
    assert metrics["unparsed_rate"] == 0.0
    assert metrics["tweets_per_s"] == 12.5
    # All correct on three classes only: the four absent classes still count.
    some = predictions([ALE, TRI, OTR], [ALE, TRI, OTR])
    metrics = compute_metrics(some)
    assert metrics["accuracy"] == 1.0
    assert metrics["f1_macro"] == pytest.approx(3 / 7)
    assert_matches_sklearn(some, metrics)


def test_all_wrong() -> None:
    wrong = predictions(
        [ALE, TRI, DES, IRA, MIE, SOR, OTR], [TRI, DES, IRA, MIE, SOR, OTR, ALE], parsed=[False] * 7
    )
    metrics = compute_metrics(wrong)
    assert_matches_sklearn(wrong, metrics)
    assert metrics["f1_macro"] == metrics["accuracy"] == metrics["f1_weighted"] == 0.0
    assert metrics["unparsed_rate"] == 1.0
    assert metrics["tweets_per_s"] is None


def test_unknown_label_and_empty_frame_are_refused() -> None:
    with pytest.raises(ValueError, match="Alegria"):
        compute_metrics(predictions([ALE], ["Alegria"]))
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics(predictions([], []))


def test_confusion_and_row_normalisation() -> None:
    matrix = confusion(MIXED)
    assert matrix.shape == (7, 7)
    assert matrix[LABELS.index(ALE), LABELS.index(OTR)] == 1  # rows gold, columns predicted
    rates = row_normalise(matrix)
    assert rates[LABELS.index(ALE)].sum() == pytest.approx(1.0)
    assert (rates[LABELS.index(SOR)] == 0).all()  # no gold Sorpresa: zeros, not NaN
    assert not np.isnan(rates).any()


def test_flat_metric_names_are_ascii_and_valid_for_mlflow() -> None:
    flat = flat_metrics(compute_metrics(MIXED, {"tweets_per_s": 3.0}))
    assert flat["f1_Alegria"] == pytest.approx(compute_metrics(MIXED)["per_class"][ALE]["f1"])
    assert {"f1_macro", "accuracy", "f1_weighted", "unparsed_rate", "tweets", "tweets_per_s"} <= (
        set(flat)
    )
    for label in LABELS:
        for score in ("precision", "recall", "f1"):
            assert f"{score}_{ascii_name(label)}" in flat
    for name in flat:
        assert name.isascii() and re.fullmatch(r"[A-Za-z0-9_]+", name), name
    assert all(isinstance(v, float) for v in flat.values())


def test_write_metrics_from_a_predictions_file(tmp_path: Path) -> None:
    frame = MIXED.copy()
    for column in score_columns():
        frame[column] = np.nan
    meta = {"model": "m", "strategy": "zero_shot_generate", "method": "generate",
            "tweets_per_s": 4.0, "seconds": 3.0}
    tsv, js = tmp_path / "p.tsv", tmp_path / "p.json"
    write_result(Result(frame, meta), str(tsv), str(js))
    out = tmp_path / "metrics" / "m.json"
    metrics = write_metrics(tsv, js, out, model="m", strategy="zero_shot_generate")
    assert json.loads(out.read_text(encoding="utf-8")) == metrics
    assert metrics["unparsed"] == 2  # "False" read back from the TSV
    assert (metrics["model"], metrics["strategy"], metrics["tweets_per_s"]) == (
        "m", "zero_shot_generate", 4.0
    )
    assert_matches_sklearn(MIXED, metrics)


def fake_metrics(model: str, strategy: str, f1: float) -> dict:
    per_class = {label: {"precision": f1, "recall": f1, "f1": f1, "support": 1, "predicted": 1}
                 for label in LABELS}
    return {"model": model, "strategy": strategy, "f1_macro": f1, "accuracy": f1,
            "f1_weighted": f1, "unparsed_rate": 0.25, "tweets_per_s": 2.0, "per_class": per_class}


def test_table_rows_follow_the_notebook_then_the_extras() -> None:
    strategies = list(STRATEGIES)
    metrics = [fake_metrics("llama", s, 0.5) for s in strategies if s != "baseline_tfidf"]
    metrics += [fake_metrics("smol", s, 0.4) for s in strategies[:2]]
    metrics.append(fake_metrics("baseline", "baseline_tfidf", 0.3))
    metrics.append(fake_metrics("aaa-unlisted", "zero_shot_generate", 0.2))
    rng = np.random.default_rng(0)
    shuffled = [metrics[i] for i in rng.permutation(len(metrics))]
    table = results_table(shuffled, model_order=["smol", "llama"])
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert list(TABLE_COLUMNS[2:6]) == ["F1 macro", "F1 Alegría", "F1 Tristeza", "F1 Otras"]
    rows = list(zip(table["experiment"], table["model"], strict=True))
    assert rows[:7] == [
        ("zero_shot_generate", "smol"),
        ("zero_shot_generate", "llama"),
        ("zero_shot_generate", "aaa-unlisted"),
        ("zero_shot_first_token", "smol"),
        ("zero_shot_first_token", "llama"),
        ("few_shot_generate", "llama"),
        ("few_shot_first_token", "llama"),
    ]
    assert rows[7] == ("finetuned_first_token", "llama")
    assert [e for e, _ in rows[8:]] == [
        "zero_shot_label_likelihood",
        "few_shot_label_likelihood",
        "finetuned_label_likelihood",
        "linear_probe",
        "baseline_tfidf",
    ]
    assert table["unparsed %"].tolist() == [25.0] * len(table)


def test_table_files(tmp_path: Path) -> None:
    missing_speed = fake_metrics("smol", "zero_shot_generate", 0.123456)
    missing_speed["tweets_per_s"] = None
    table = results_table([missing_speed, fake_metrics("baseline", "baseline_tfidf", 0.5)])
    md, csv = tmp_path / "t.md", tmp_path / "t.csv"
    write_table(table, md, csv)
    lines = md.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "| " + " | ".join(TABLE_COLUMNS) + " |"
    assert lines[2].startswith("| smol | zero_shot_generate | 0.123 |")
    # unknown speed, no validation, the prompt file's own prompt: blank
    assert lines[2].endswith("| 25.0 |  |  |  |")
    assert table_markdown(table).splitlines() == lines
    back = pd.read_csv(csv)
    assert list(back.columns) == list(TABLE_COLUMNS)
    assert back["F1 macro"].tolist() == [0.1235, 0.5]
    assert np.isnan(back["tweets/s"][0])


def test_confusion_figure_is_a_png(tmp_path: Path) -> None:
    out = tmp_path / "fig" / "c.png"
    write_confusion_figure(confusion(MIXED), out, title="m · s")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
