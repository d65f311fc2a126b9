"""Intervals, paired tests and their correction, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score
from statsmodels.stats.contingency_tables import mcnemar as statsmodels_mcnemar
from statsmodels.stats.multitest import multipletests

from emoprompt.evaluation.comparisons import (
    FLOOR,
    Run,
    SeededRun,
    compare_pooled,
    compare_runs,
    comparison_plan,
    comparisons_markdown,
    detectable_difference,
    summary_lines,
)
from emoprompt.evaluation.statistics import (
    StatisticsSettings,
    holm,
    mcnemar_exact,
    paired_difference,
    pooled_difference,
    score_intervals,
)
from emoprompt.labels import LABELS

SETTINGS = StatisticsSettings(resamples=2999, seed=7)


def classifier(n: int, accuracy: float, seed: int, shares=None) -> tuple[np.ndarray, np.ndarray]:
    """Gold labels (imbalanced like EmoEvalEs) and a classifier that is right with
    probability ``accuracy`` and otherwise names another class at random."""
    rng = np.random.default_rng(seed)
    shares = shares or [0.2, 0.12, 0.03, 0.1, 0.03, 0.05, 0.47]
    gold = rng.choice(len(LABELS), size=n, p=shares)
    wrong = (gold + rng.integers(1, len(LABELS), size=n)) % len(LABELS)
    predicted = np.where(rng.random(n) < accuracy, gold, wrong)
    names = np.array(LABELS)
    return names[gold], names[predicted]


def _plain_bootstrap(gold, predicted, resamples, seed, confidence=0.95):
    """A percentile bootstrap by hand: resample tweets, score with scikit-learn."""
    rng = np.random.default_rng(seed)
    n = len(gold)
    values = {"f1_macro": [], "accuracy": []}
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        g, p = gold[idx], predicted[idx]
        values["f1_macro"].append(
            f1_score(g, p, labels=list(LABELS), average="macro", zero_division=0)
        )
        values["accuracy"].append(accuracy_score(g, p))
    tail = (1 - confidence) / 2 * 100
    return {k: np.percentile(v, [tail, 100 - tail]) for k, v in values.items()}


def test_intervals_match_an_independent_bootstrap_and_scores_match_scikit_learn():
    gold, predicted = classifier(150, 0.45, seed=3)
    intervals = score_intervals(gold, predicted, SETTINGS)
    assert intervals["f1_macro"]["value"] == pytest.approx(
        f1_score(gold, predicted, labels=list(LABELS), average="macro", zero_division=0)
    )
    assert intervals["f1_weighted"]["value"] == pytest.approx(
        f1_score(gold, predicted, labels=list(LABELS), average="weighted", zero_division=0)
    )
    per_class = f1_score(gold, predicted, labels=list(LABELS), average=None, zero_division=0)
    for label, value in zip(LABELS, per_class, strict=True):
        assert intervals[f"f1_{label}"]["value"] == pytest.approx(value)
    # Another generator, another loop: the same interval up to Monte Carlo error.
    plain = _plain_bootstrap(gold, predicted, 2000, seed=11)
    for name in ("f1_macro", "accuracy"):
        low, high = plain[name]
        assert intervals[name]["low"] == pytest.approx(low, abs=0.012), name
        assert intervals[name]["high"] == pytest.approx(high, abs=0.012), name
        assert intervals[name]["low"] < intervals[name]["value"] < intervals[name]["high"]


def test_intervals_are_seeded():
    gold, predicted = classifier(80, 0.5, seed=1)
    assert score_intervals(gold, predicted, SETTINGS) == score_intervals(gold, predicted, SETTINGS)
    other = StatisticsSettings(resamples=2999, seed=8)
    assert score_intervals(gold, predicted, other) != score_intervals(gold, predicted, SETTINGS)


def test_accuracy_intervals_cover_the_true_accuracy_about_95_percent_of_the_time():
    settings = StatisticsSettings(resamples=999, seed=0)
    samples, truth = 240, 0.4
    covered = 0
    for seed in range(samples):
        gold, predicted = classifier(100, truth, seed=1000 + seed)
        interval = score_intervals(gold, predicted, settings)["accuracy"]
        covered += interval["low"] <= truth <= interval["high"]
    assert 0.90 <= covered / samples <= 0.99, covered / samples


def test_mcnemar_is_the_binomial_test_on_the_discordant_tweets():
    gold, a = classifier(120, 0.6, seed=4)
    _, b = classifier(120, 0.3, seed=5)
    b = np.where(np.random.default_rng(6).random(120) < 0.3, gold, b)
    result = mcnemar_exact(gold, a, b)
    only_a = int(np.sum((a == gold) & (b != gold)))
    only_b = int(np.sum((a != gold) & (b == gold)))
    assert (result.a_only, result.b_only) == (only_a, only_b)
    assert result.p_value == pytest.approx(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    both = int(np.sum((a == gold) & (b == gold)))
    neither = len(gold) - both - only_a - only_b
    table = [[both, only_a], [only_b, neither]]
    assert result.p_value == pytest.approx(statsmodels_mcnemar(table, exact=True).pvalue)
    assert mcnemar_exact(gold, a, a).p_value == 1.0


def _holm_by_hand(p_values, alpha):
    order = np.argsort(p_values)
    m = len(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist(), [p <= alpha for p in adjusted]


def test_holm_matches_statsmodels_and_its_definition():
    p_values = [0.01, 0.04, 0.03, 0.005, 0.2, 0.049]
    corrected, significant = holm(p_values, 0.05)
    reject, expected, _, _ = multipletests(p_values, alpha=0.05, method="holm")
    assert corrected == pytest.approx(expected.tolist())
    assert significant == reject.tolist()
    by_hand, by_hand_significant = _holm_by_hand(p_values, 0.05)
    assert corrected == pytest.approx(by_hand) and significant == by_hand_significant
    assert holm([], 0.05) == ([], [])


def test_paired_difference_sees_a_real_gap_and_not_a_tie():
    gold, good = classifier(200, 0.7, seed=9)
    _, bad = classifier(200, 0.2, seed=9)  # same gold labels: same seed, same draws
    gap = paired_difference(gold, good, bad, SETTINGS)
    assert gap.value > 0 and gap.low > 0 and gap.p_value < 0.01
    reverse = paired_difference(gold, bad, good, SETTINGS)
    assert reverse.value == pytest.approx(-gap.value)
    assert paired_difference(gold, good, good, SETTINGS).p_value == 1.0
    # Another classifier of the same quality on the same tweets: no significant difference.
    rng = np.random.default_rng(10)
    codes = np.array([LABELS.index(g) for g in gold])
    wrong = np.array(LABELS)[(codes + rng.integers(1, len(LABELS), size=len(gold))) % 7]
    twin = np.where(rng.random(len(gold)) < 0.7, gold, wrong)
    tie = paired_difference(gold, good, twin, SETTINGS)
    assert tie.low < 0 < tie.high and tie.p_value > 0.05


def _runs(n=60) -> list[Run]:
    gold, good = classifier(n, 0.8, seed=2)
    _, poor = classifier(n, 0.3, seed=2)
    _, base = classifier(n, 0.6, seed=2)
    ids = [f"t{i}" for i in range(n)]

    def run(name, predicted):
        return Run(name, pd.DataFrame({"id": ids, "gold": gold, "predicted": predicted}))

    return [run("m/a", good), run("m/b", poor), run("m/c", poor), run("baseline/tfidf", base)]


def test_every_pair_of_a_models_rows_the_baseline_and_the_floor_are_compared():
    runs = _runs()
    plan = comparison_plan(runs, "baseline/tfidf")
    assert [(a, b) for a, b, k in plan if k == "same model"] == [
        ("m/a", "m/b"),
        ("m/a", "m/c"),
        ("m/b", "m/c"),
    ]
    assert {a for a, b, k in plan if k == "vs baseline"} == {"m/a", "m/b", "m/c"}
    assert {a for a, b, k in plan if b == FLOOR} == {r.name for r in runs}
    table = compare_runs(runs, SETTINGS, baseline="baseline/tfidf")
    assert len(table) == len(plan) == 3 + 3 + 4
    row = table[(table["a"] == "m/a") & (table["b"] == "m/b")].iloc[0]
    assert row["better"] == "m/a" and bool(row["significant"])
    tie = table[(table["a"] == "m/b") & (table["b"] == "m/c")].iloc[0]
    assert tie["difference"] == 0 and tie["p_bootstrap"] == 1.0 and not tie["significant"]
    # Holm: corrected p-values never below the raw ones, as many as there are rows.
    assert (table["p_bootstrap_holm"] >= table["p_bootstrap"] - 1e-12).all()
    assert compare_runs(runs, SETTINGS, baseline="baseline/tfidf").equals(table)
    assert detectable_difference(table) > 0
    text = comparisons_markdown(table, SETTINGS)
    assert "| m/a | m/b | same model |" in text and summary_lines(table, SETTINGS)[0] in text


def test_runs_on_other_tweets_are_refused():
    runs = _runs()
    other = runs[1].predictions.assign(id=[f"x{i}" for i in range(len(runs[1].predictions))])
    with pytest.raises(ValueError, match="m/b scored other tweets than m/a"):
        compare_runs([runs[0], Run("m/b", other)], SETTINGS)


def test_indistinguishable_rows_recommend_the_whole_test_split():
    runs = _runs(n=20)
    table = compare_runs([runs[1], runs[2]], SETTINGS)
    assert any("sample_size=all" in line for line in summary_lines(table, SETTINGS))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown statistics setting"):
        StatisticsSettings.from_mapping({"confidance": 0.9})
    with pytest.raises(ValueError, match="method"):
        StatisticsSettings.from_mapping({"method": "jackknife"})
    assert StatisticsSettings.from_mapping({"confidence": 0.9}).alpha == pytest.approx(0.1)


def test_pooled_difference_over_one_sample_is_the_paired_difference():
    gold, good = classifier(150, 0.7, seed=21)
    _, bad = classifier(150, 0.3, seed=21)
    one = pooled_difference([(gold, [good], [bad])], SETTINGS)
    paired = paired_difference(gold, good, bad, SETTINGS)
    assert one.value == pytest.approx(paired.value)
    assert one.low == pytest.approx(paired.low, abs=0.02)
    assert one.high == pytest.approx(paired.high, abs=0.02)
    assert pooled_difference([(gold, [good], [good])], SETTINGS).p_value == 1.0


def test_pooling_samples_averages_them_and_narrows_the_interval():
    groups, singles = [], []
    for seed in (31, 32, 33):
        gold, a = classifier(100, 0.55, seed=seed)
        _, b = classifier(100, 0.45, seed=seed)
        groups.append((gold, [a], [b]))
        singles.append(paired_difference(gold, a, b, SETTINGS))
    pooled = pooled_difference(groups, SETTINGS)
    assert pooled.value == pytest.approx(np.mean([d.value for d in singles]))
    assert pooled.high - pooled.low < np.mean([d.high - d.low for d in singles])


def test_grid_rows_are_compared_over_the_samples_both_scored():
    runs = []
    for seed in (1, 2):
        gold, good = classifier(50, 0.8, seed=seed)
        _, poor = classifier(50, 0.3, seed=seed)
        ids = [f"s{seed}-{i}" for i in range(50)]
        frame = pd.DataFrame({"id": ids, "gold": gold})
        runs.append(SeededRun("m/good", seed, frame.assign(predicted=good)))
        runs.append(SeededRun("m/good", seed, frame.assign(predicted=good)))  # 2 shot seeds
        runs.append(SeededRun("m/poor", seed, frame.assign(predicted=poor)))
    table = compare_pooled(runs, SETTINGS)
    row = table[(table["a"] == "m/good") & (table["b"] == "m/poor")].iloc[0]
    assert (row["samples"], row["runs_a"], row["runs_b"]) == (2, 4, 2)
    assert row["better"] == "m/good" and bool(row["significant"])
    assert set(table["b"]) == {"m/poor", FLOOR}


def test_a_fine_tuned_model_is_compared_with_the_rows_of_its_base():
    runs = _runs()
    runs[2] = Run("m-ft/c", runs[2].predictions)
    alone = comparison_plan(runs, "baseline/tfidf")
    assert [(a, b) for a, b, k in alone if k == "same model"] == [("m/a", "m/b")]
    plan = comparison_plan(runs, "baseline/tfidf", families={"m-ft": "m"})
    assert [(a, b) for a, b, k in plan if k == "same model"] == [
        ("m/a", "m/b"),
        ("m/a", "m-ft/c"),
        ("m/b", "m-ft/c"),
    ]


def test_the_significance_figures_are_drawn_from_the_comparisons(tmp_path):
    from emoprompt.reporting.significance import write_significance_figures

    runs = _runs()
    table = compare_runs(runs, SETTINGS, baseline="baseline/tfidf")
    metrics = [
        {"model": r.name.split("/")[0], "strategy": r.name.split("/")[1], "tweets": 40,
         "f1_macro": 0.3 + 0.1 * i,
         "intervals": {"f1_macro": {"low": 0.2 + 0.1 * i, "high": 0.4 + 0.1 * i}}}
        for i, r in enumerate(runs)
    ]  # fmt: skip
    forest, matrix = tmp_path / "forest.png", tmp_path / "matrix.png"
    write_significance_figures(metrics, table, forest, matrix, "baseline/tfidf", 0.95)
    for path in (forest, matrix):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
