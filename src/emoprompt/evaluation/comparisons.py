"""Which rows of the results table differ beyond chance: every paired comparison.

Compared on the same tweets: every pair of one model's rows, each row against the
TF-IDF baseline, and each row against the majority-class floor (always ``Otras``, the
largest class). Each comparison has the paired bootstrap of the macro-F1 difference
(interval and p-value) and the exact McNemar test on correctness; each family of
p-values is corrected for multiple comparisons with Holm's method, and a difference is
called significant when its Holm-corrected bootstrap p-value is at most ``1 - confidence``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from emoprompt.evaluation.statistics import (
    StatisticsSettings,
    confusions,
    holm,
    label_codes,
    mcnemar_exact,
    paired_difference,
    pooled_difference,
    scores,
)
from emoprompt.infra.files import atomic_open
from emoprompt.labels import LABELS

FLOOR = "floor/always_Otras"
FLOOR_LABEL = "Otras"  # the largest class of EmoEvalEs (about half of every split)
COLUMNS = (
    "a",
    "b",
    "kind",
    "tweets",
    "macro_f1_a",
    "macro_f1_b",
    "difference",
    "difference_low",
    "difference_high",
    "p_bootstrap",
    "p_bootstrap_holm",
    "accuracy_a",
    "accuracy_b",
    "only_a_right",
    "only_b_right",
    "p_mcnemar",
    "p_mcnemar_holm",
    "better",
    "significant",
)


@dataclass(frozen=True)
class Run:
    """One row of the results table: its name (``model/strategy``) and predictions."""

    name: str
    predictions: pd.DataFrame  # id, gold, predicted


def floor_run(reference: Run) -> Run:
    """The majority-class floor on the same tweets: every answer ``Otras``."""
    frame = reference.predictions[["id", "gold"]].assign(predicted=FLOOR_LABEL)
    return Run(FLOOR, frame)


def aligned(runs: Sequence[Run]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The gold labels and each run's predictions in one tweet order; refuses runs that
    did not score the same tweets with the same gold labels."""
    first = runs[0].predictions.set_index("id")
    ids = sorted(first.index)
    gold = first.loc[ids, "gold"].astype(str).tolist()
    out = {}
    for run in runs:
        frame = run.predictions.set_index("id")
        if sorted(frame.index) != ids:
            raise ValueError(
                f"{run.name} scored other tweets than {runs[0].name}: paired tests need the "
                "same evaluation sample"
            )
        if frame.loc[ids, "gold"].astype(str).tolist() != gold:
            raise ValueError(f"{run.name} has other gold labels than {runs[0].name}")
        out[run.name] = frame.loc[ids, "predicted"].astype(str).to_numpy()
    return gold, out


def comparison_plan(
    runs: Sequence[Run], baseline: str | None, families: Mapping[str, str] | None = None
) -> list[tuple[str, str, str]]:
    """(a, b, kind) of every comparison: the pairs of one model's rows, each row against
    the baseline, each row (the baseline's too) against the floor.

    ``families`` maps a model to the model it counts with (a fine-tuned model to its
    base), so that the fine-tuned rows are tested against the prompting rows of the
    model they were trained from."""
    families = families or {}
    names = [r.name for r in runs]

    def family(name: str) -> str:
        model = name.split("/", 1)[0]
        return families.get(model, model)

    plan = []
    for model in dict.fromkeys(family(n) for n in names):
        own = [n for n in names if family(n) == model and n != baseline]
        plan += [(a, b, "same model") for i, a in enumerate(own) for b in own[i + 1 :]]
    rows = [n for n in names if n != baseline]
    if baseline in names:
        plan += [(a, baseline, "vs baseline") for a in rows]
    plan += [(a, FLOOR, "vs floor") for a in names]
    return plan


def compare_runs(
    runs: Sequence[Run],
    settings: StatisticsSettings,
    baseline: str | None = None,
    families: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Every comparison of :func:`comparison_plan` as one row (see ``COLUMNS``)."""
    if not runs:
        raise ValueError("no runs to compare")
    everything = [*runs, floor_run(runs[0])]
    gold, predicted = aligned(everything)
    rows = []
    for a, b, kind in comparison_plan(runs, baseline, families):
        diff = paired_difference(gold, predicted[a], predicted[b], settings)
        test = mcnemar_exact(gold, predicted[a], predicted[b])
        rows.append(
            {
                "a": a,
                "b": b,
                "kind": kind,
                "tweets": len(gold),
                "macro_f1_a": _macro(gold, predicted[a]),
                "macro_f1_b": _macro(gold, predicted[b]),
                "difference": diff.value,
                "difference_low": diff.low,
                "difference_high": diff.high,
                "p_bootstrap": diff.p_value,
                "accuracy_a": float(np.mean(predicted[a] == np.array(gold))),
                "accuracy_b": float(np.mean(predicted[b] == np.array(gold))),
                "only_a_right": test.a_only,
                "only_b_right": test.b_only,
                "p_mcnemar": test.p_value,
                "better": a if diff.value > 0 else b if diff.value < 0 else "neither",
            }
        )
    table = pd.DataFrame(rows)
    table["p_bootstrap_holm"], significant = holm(table["p_bootstrap"].tolist(), settings.alpha)
    table["p_mcnemar_holm"], _ = holm(table["p_mcnemar"].tolist(), settings.alpha)
    table["significant"] = significant
    return table[list(COLUMNS)]


def _macro(gold: Sequence[str], predicted: np.ndarray) -> float:
    matrix = confusions(label_codes(gold), label_codes(predicted), len(LABELS))
    return float(scores(matrix)["f1_macro"])


def detectable_difference(table: pd.DataFrame) -> float:
    """The smallest macro-F1 difference this sample can tell from chance, as the bootstrap
    measures it: the median half-width of the paired differences' intervals (between
    one model's rows where there are such pairs, else over every comparison)."""
    rows = table[table["kind"] == "same model"]
    rows = rows if len(rows) else table
    return float(np.median((rows["difference_high"] - rows["difference_low"]) / 2))


def summary_lines(table: pd.DataFrame, settings: StatisticsSettings) -> list[str]:
    """What the sample can show, in a few sentences (for the table and the comparisons)."""
    tweets = int(table["tweets"].iloc[0])
    level = f"{settings.confidence:.0%}"
    lines = [
        f"Intervals: {level} {settings.method} bootstrap over the {tweets} tweets "
        f"({settings.resamples:,} resamples, seed {settings.seed}). Comparisons: paired "
        f"bootstrap of the macro-F1 difference and exact McNemar test on the same tweets, "
        f"p-values Holm-corrected over the {len(table)} comparisons; significant at "
        f"{settings.alpha:g}.",
        f"At {tweets} tweets, macro-F1 differences smaller than about "
        f"{detectable_difference(table):.3f} cannot be told apart from chance.",
    ]
    same = table[table["kind"] == "same model"]
    if len(same) and not same["significant"].any():
        lines.append(
            "No two prompting rows of a model differ significantly: score the whole test "
            "split (`--config sample_size=all`) before ranking them."
        )
    return lines


def _cell(value) -> str:
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.001 and value != 0 else f"{value:.3f}"
    return str(value)


def comparisons_markdown(table: pd.DataFrame, settings: StatisticsSettings) -> str:
    lines = ["# Paired comparisons", "", *summary_lines(table, settings), ""]
    header = (
        "| a | b | kind | macro F1 a | macro F1 b | difference [interval] | p (bootstrap, Holm) "
        "| only a right / only b right | p (McNemar, Holm) | better | significant |"
    )
    lines += [header, "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for row in table.itertuples(index=False):
        interval = f"{row.difference:+.3f} [{row.difference_low:+.3f}, {row.difference_high:+.3f}]"
        lines.append(
            f"| {row.a} | {row.b} | {row.kind} | {row.macro_f1_a:.3f} | {row.macro_f1_b:.3f} "
            f"| {interval} | {_cell(row.p_bootstrap_holm)} | {row.only_a_right} / "
            f"{row.only_b_right} | {_cell(row.p_mcnemar_holm)} | {row.better} "
            f"| {_cell(bool(row.significant))} |"
        )
    return "\n".join(lines) + "\n"


def _write(table: pd.DataFrame, markdown: str, md_path: str, csv_path: str) -> None:
    with atomic_open(md_path) as handle:
        handle.write(markdown)
    with atomic_open(csv_path, newline="") as handle:
        table.to_csv(handle, index=False, lineterminator="\n", float_format="%.6g")


def write_comparisons(
    table: pd.DataFrame, settings: StatisticsSettings, md_path: str, csv_path: str
) -> None:
    _write(table, comparisons_markdown(table, settings), md_path, csv_path)


def read_comparisons(path: str) -> pd.DataFrame:
    table = pd.read_csv(path)
    table["significant"] = table["significant"].astype(str).str.lower() == "true"
    return table


# ---------------------------------------------------------------- study grids
POOLED_COLUMNS = (
    "a",
    "b",
    "kind",
    "samples",
    "runs_a",
    "runs_b",
    "difference",
    "difference_low",
    "difference_high",
    "p_bootstrap",
    "p_bootstrap_holm",
    "better",
    "significant",
)


@dataclass(frozen=True)
class SeededRun:
    """One run of a study grid: its row's name, its evaluation sample's seed, predictions."""

    name: str
    sample_seed: int
    predictions: pd.DataFrame


def compare_pooled(
    runs: Sequence[SeededRun], settings: StatisticsSettings, baseline: str | None = None
) -> pd.DataFrame:
    """The comparisons of :func:`comparison_plan` between the grid's rows, each pooled over
    the evaluation samples that both rows scored (:func:`pooled_difference`)."""
    names = list(dict.fromkeys(r.name for r in runs))
    by_seed: dict[int, list[SeededRun]] = {}
    for run in runs:
        by_seed.setdefault(run.sample_seed, []).append(run)
    aligned_by_seed = {}
    for seed, seeded in by_seed.items():
        plain = [Run(f"{r.name}#{i}", r.predictions) for i, r in enumerate(seeded)]
        gold, predicted = aligned([*plain, floor_run(plain[0])])
        aligned_by_seed[seed] = (gold, seeded, list(predicted.values()))
    rows = []
    plan = comparison_plan([Run(n, pd.DataFrame()) for n in names], baseline)
    for a, b, kind in plan:
        groups, count_a, count_b = [], 0, 0
        for gold, seeded, predicted in aligned_by_seed.values():
            of = {
                name: [p for r, p in zip(seeded, predicted, strict=False) if r.name == name]
                for name in (a, b)
            }
            of[FLOOR] = [predicted[-1]]
            if of[a] and of[b]:
                groups.append((gold, of[a], of[b]))
                count_a, count_b = count_a + len(of[a]), count_b + len(of[b])
        if not groups:
            continue
        diff = pooled_difference(groups, settings)
        rows.append(
            {
                "a": a,
                "b": b,
                "kind": kind,
                "samples": len(groups),
                "runs_a": count_a,
                "runs_b": count_b,
                "difference": diff.value,
                "difference_low": diff.low,
                "difference_high": diff.high,
                "p_bootstrap": diff.p_value,
                "better": a if diff.value > 0 else b if diff.value < 0 else "neither",
            }
        )
    table = pd.DataFrame(
        rows, columns=[c for c in POOLED_COLUMNS if c not in ("p_bootstrap_holm", "significant")]
    )
    table["p_bootstrap_holm"], table["significant"] = holm(
        table["p_bootstrap"].tolist(), settings.alpha
    )
    return table[list(POOLED_COLUMNS)]


def pooled_markdown(table: pd.DataFrame, settings: StatisticsSettings) -> str:
    lines = [
        "# Paired comparisons pooled over the grid's samples",
        "",
        f"Each row: the mean over the evaluation samples that both rows scored of the "
        f"macro-F1 difference (a minus b; a row's runs with several few-shot seeds "
        f"averaged), with its {settings.confidence:.0%} stratified bootstrap interval "
        f"(tweets resampled within each sample, {settings.resamples:,} resamples, seed "
        f"{settings.seed}); p-values Holm-corrected over the {len(table)} comparisons.",
        "",
        "| a | b | kind | samples | runs a / b | difference [interval] | p (Holm) | better "
        "| significant |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for row in table.itertuples(index=False):
        interval = f"{row.difference:+.3f} [{row.difference_low:+.3f}, {row.difference_high:+.3f}]"
        lines.append(
            f"| {row.a} | {row.b} | {row.kind} | {row.samples} | {row.runs_a} / {row.runs_b} "
            f"| {interval} | {_cell(row.p_bootstrap_holm)} | {row.better} "
            f"| {_cell(bool(row.significant))} |"
        )
    return "\n".join(lines) + "\n"


def write_pooled(
    table: pd.DataFrame, settings: StatisticsSettings, md_path: str, csv_path: str
) -> None:
    _write(table, pooled_markdown(table, settings), md_path, csv_path)
