"""Choosing a family's variant on validation, and the chosen variant's prediction files.

:func:`choose_variant` reads the variants' predictions on the validation sample and
nothing else: the `choose_variant` rule is given no test file. The rule: the highest
validation macro F1; among equals, the higher validation accuracy; then the earlier
variant in the family's order, which puts the prompt file's own prompt first.
:func:`write_chosen` then writes the chosen variant's test predictions as the strategy's
usual files, so the results table, the paired comparisons and MLflow read them as any
other run, marked as chosen on validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

from emoprompt.evaluation.metrics import validation_summary
from emoprompt.evaluation.predictions import Result, read_predictions, write_result
from emoprompt.evaluation.statistics import StatisticsSettings
from emoprompt.infra.files import write_json
from emoprompt.labels import LABELS

TIE_RULE = (
    "highest validation macro F1; among equals the higher validation accuracy, then the "
    "earlier variant in the family's order (the prompt file's own prompt first)"
)


def variant_scores(predictions: pd.DataFrame) -> pd.DataFrame:
    """Macro F1 and accuracy of each variant (``variant`` column), in the family's
    order (the order of first appearance)."""
    rows = []
    for variant, frame in predictions.groupby("variant", sort=False):
        gold, predicted = frame["gold"].astype(str), frame["predicted"].astype(str)
        rows.append(
            {
                "variant": variant,
                "f1_macro": float(
                    f1_score(gold, predicted, labels=list(LABELS), average="macro", zero_division=0)
                ),
                "accuracy": float(accuracy_score(gold, predicted)),
                "tweets": len(frame),
            }
        )
    return pd.DataFrame(rows, columns=["variant", "f1_macro", "accuracy", "tweets"])


def choose_variant(
    validation: pd.DataFrame,
    record: Mapping[str, Any],
    statistics: StatisticsSettings | None = None,
) -> dict[str, Any]:
    """The variant chosen on ``validation`` (its predictions on the validation sample)
    by :data:`TIE_RULE`; ``record`` is the family job's record (the variants' values)."""
    scores = variant_scores(validation)
    if scores.empty:
        raise ValueError("no validation predictions to choose a variant from")
    order = {v["id"]: i for i, v in enumerate(record["variants"])}
    ranked = scores.assign(
        f1=scores["f1_macro"].round(12),
        acc=scores["accuracy"].round(12),
        position=scores["variant"].map(order),
    ).sort_values(["f1", "acc", "position"], ascending=[False, False, True])
    chosen = str(ranked["variant"].iloc[0])
    variant = next(v for v in record["variants"] if v["id"] == chosen)
    rows = validation[validation["variant"] == chosen]
    return {
        "chosen": chosen,
        "label": variant["label"],
        "values": variant["values"],
        "rule": TIE_RULE,
        "variants": len(scores),
        "validation": validation_summary(rows["gold"], rows["predicted"], statistics),
        "validation_sample": record.get("validation_sample"),
        "scores": [
            {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
            for row in scores.to_dict("records")
        ],
    }


def write_choice(
    validation_path: str, record: Mapping[str, Any], out: str, statistics=None
) -> dict[str, Any]:
    """The `choose_variant` job: read the validation predictions, write the choice."""
    validation = read_predictions(validation_path)
    choice = choose_variant(validation, record, StatisticsSettings.from_mapping(statistics))
    write_json(out, choice)
    return choice


def write_chosen(
    choice: Mapping[str, Any],
    test_path: str,
    record: Mapping[str, Any],
    tsv_out: str,
    json_out: str,
) -> Result:
    """The chosen variant's test predictions as the strategy's prediction files."""
    test = read_predictions(test_path)
    frame = test[test["variant"] == choice["chosen"]].drop(columns="variant")
    if frame.empty:
        raise ValueError(f"{test_path}: no predictions of the chosen variant {choice['chosen']}")
    variant = next(v for v in record["variants"] if v["id"] == choice["chosen"])
    ids = set(frame["id"])
    job = {k: v for k, v in record.items() if k not in ("variants", "family")}
    metadata = {
        **job,
        **variant["run"],
        "tweets": len(frame),
        "unparsed": int((~frame["parsed"]).sum()),
        "truncated": int(frame["truncated"].sum()),
        "truncated_ids": [i for i in variant["run"].get("truncated_ids", []) if i in ids],
        "validation": choice["validation"],
        "prompt_choice": {
            "chosen_on": "validation",
            "variant": choice["chosen"],
            "label": choice["label"],
            "values": choice["values"],
            "of": choice["variants"],
            "rule": choice["rule"],
            "family": record.get("family"),
        },
    }
    result = Result(frame.reset_index(drop=True), metadata)
    write_result(result, tsv_out, json_out)
    return result
