"""How sure a score is: bootstrap intervals, paired tests, multiple-comparison control.

* :func:`score_intervals` - a seeded bootstrap interval (resampling tweets) of macro F1,
  accuracy, weighted F1 and each class's F1 of one run (``scipy.stats.bootstrap``).
* :func:`paired_difference` - the paired bootstrap of the macro-F1 difference between
  two runs on the same tweets (each resample draws the same tweets for both), with its
  interval and a two-sided p-value (the interval inverted: ``p < 1 - confidence``
  exactly when the percentile interval excludes 0).
* :func:`mcnemar_exact` - the exact McNemar test on correctness: a two-sided binomial
  test on the discordant tweets (one run right, the other wrong).
* :func:`holm` - Holm's step-down correction of a family of p-values (``statsmodels``).

The scores are computed from confusion matrices of each resample at once, the same
definitions as :mod:`emoprompt.evaluation.metrics` (``zero_division=0``: a class never
predicted or absent counts with F1 0 in the macro average).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from emoprompt.labels import LABELS

METHODS = ("percentile", "basic", "BCa")
# Resamples computed at once: bounds the memory to a few arrays of BATCH x tweets.
BATCH = 1000


@dataclass(frozen=True)
class StatisticsSettings:
    """The ``statistics:`` block of config.yaml (see the schema)."""

    confidence: float = 0.95
    resamples: int = 9999
    seed: int = 0
    method: str = "percentile"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> StatisticsSettings:
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown statistics setting(s): {', '.join(unknown)}")
        settings = cls(**values)
        if not 0 < settings.confidence < 1:
            raise ValueError("statistics confidence must be between 0 and 1")
        if settings.resamples < 100:
            raise ValueError("statistics resamples must be at least 100")
        if settings.method not in METHODS:
            raise ValueError(f"statistics method must be one of {', '.join(METHODS)}")
        return settings

    @property
    def alpha(self) -> float:
        """The significance level of the tests: 1 - confidence."""
        return round(1.0 - self.confidence, 10)

    def record(self) -> dict[str, Any]:
        return asdict(self)


def label_codes(values: Sequence[str], labels: Sequence[str] = LABELS) -> np.ndarray:
    """Each label's position in ``labels`` (a label outside them is refused)."""
    index = {label: i for i, label in enumerate(labels)}
    try:
        return np.array([index[str(v)] for v in values], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"label {exc.args[0]!r} is not one of {', '.join(labels)}") from None


def confusions(gold: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """Confusion counts (..., k, k) of label codes of shape (..., n): rows gold."""
    flat = gold * k + predicted
    lead = flat.shape[:-1]
    flat = flat.reshape(-1, flat.shape[-1])
    offsets = (np.arange(flat.shape[0]) * (k * k))[:, None]
    counts = np.bincount((flat + offsets).ravel(), minlength=flat.shape[0] * k * k)
    return counts.reshape(*lead, k, k)


def scores(matrix: np.ndarray, labels: Sequence[str] = LABELS) -> dict[str, np.ndarray]:
    """Macro F1, accuracy, weighted F1 and each class's F1 of confusion matrices
    (..., k, k); each an array of shape (...)."""
    matrix = matrix.astype(np.float64)
    true_pos = np.diagonal(matrix, axis1=-2, axis2=-1)
    support = matrix.sum(axis=-1)
    predicted = matrix.sum(axis=-2)
    denominator = support + predicted
    f1 = np.divide(2 * true_pos, denominator, out=np.zeros_like(true_pos), where=denominator > 0)
    total = support.sum(axis=-1)
    out = {
        "f1_macro": f1.mean(axis=-1),
        "accuracy": true_pos.sum(axis=-1) / total,
        "f1_weighted": (f1 * support).sum(axis=-1) / total,
    }
    for j, label in enumerate(labels):
        out[f"f1_{label}"] = f1[..., j]
    return out


SCORE_NAMES = ("f1_macro", "accuracy", "f1_weighted", *(f"f1_{label}" for label in LABELS))


def _bootstrap(data: tuple[np.ndarray, ...], statistic, settings: StatisticsSettings):
    return stats.bootstrap(
        data,
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=settings.resamples,
        confidence_level=settings.confidence,
        method=settings.method,
        batch=BATCH,
        random_state=np.random.default_rng(settings.seed),
    )


def score_intervals(
    gold: Sequence[str],
    predicted: Sequence[str],
    settings: StatisticsSettings,
    labels: Sequence[str] = LABELS,
) -> dict[str, dict[str, float]]:
    """Per score name: its value on the sample, the bootstrap interval and its standard
    error (resampling tweets with replacement, seeded)."""
    g, p = label_codes(gold, labels), label_codes(predicted, labels)
    names = ["f1_macro", "accuracy", "f1_weighted", *(f"f1_{label}" for label in labels)]
    k = len(labels)

    def statistic(gold_codes, predicted_codes, axis=-1):
        values = scores(confusions(gold_codes, predicted_codes, k), labels)
        return np.stack([values[name] for name in names])

    observed = statistic(g, p)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = _bootstrap((g, p), statistic, settings)
    low, high = result.confidence_interval
    return {
        name: {
            "value": float(observed[i]),
            "low": float(low[i]),
            "high": float(high[i]),
            "se": float(result.standard_error[i]),
        }
        for i, name in enumerate(names)
    }


@dataclass(frozen=True)
class Difference:
    """Macro F1 of ``a`` minus that of ``b`` on the same tweets, with its paired bootstrap
    interval and two-sided p-value."""

    value: float
    low: float
    high: float
    se: float
    p_value: float


def paired_difference(
    gold: Sequence[str],
    predicted_a: Sequence[str],
    predicted_b: Sequence[str],
    settings: StatisticsSettings,
    labels: Sequence[str] = LABELS,
) -> Difference:
    g = label_codes(gold, labels)
    a, b = label_codes(predicted_a, labels), label_codes(predicted_b, labels)
    k = len(labels)

    def statistic(gold_codes, codes_a, codes_b, axis=-1):
        first = scores(confusions(gold_codes, codes_a, k), labels)["f1_macro"]
        second = scores(confusions(gold_codes, codes_b, k), labels)["f1_macro"]
        return first - second

    observed = float(statistic(g, a, b))
    if np.array_equal(a, b):  # the same predictions: no difference in any resample
        return Difference(0.0, 0.0, 0.0, 0.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = _bootstrap((g, a, b), statistic, settings)
    draws = result.bootstrap_distribution
    # Two-sided: twice the smaller tail beyond 0, counted with the observed sample
    # (+1) so that a p-value is never 0 with a finite number of resamples.
    below = (np.count_nonzero(draws <= 0) + 1) / (draws.size + 1)
    above = (np.count_nonzero(draws >= 0) + 1) / (draws.size + 1)
    low, high = result.confidence_interval
    return Difference(
        value=observed,
        low=float(low),
        high=float(high),
        se=float(result.standard_error),
        p_value=float(min(1.0, 2 * min(below, above))),
    )


@dataclass(frozen=True)
class McNemar:
    """Discordant tweets: ``a_only`` right only in a, ``b_only`` right only in b."""

    a_only: int
    b_only: int
    p_value: float


def mcnemar_exact(
    gold: Sequence[str], predicted_a: Sequence[str], predicted_b: Sequence[str]
) -> McNemar:
    """The exact McNemar test: a two-sided binomial test (p = 1/2) on the discordant
    tweets; 1.0 when there are none."""
    gold, a, b = (np.asarray(list(x), dtype=object) for x in (gold, predicted_a, predicted_b))
    right_a, right_b = a == gold, b == gold
    a_only = int(np.count_nonzero(right_a & ~right_b))
    b_only = int(np.count_nonzero(~right_a & right_b))
    if a_only + b_only == 0:
        return McNemar(0, 0, 1.0)
    p_value = stats.binomtest(a_only, a_only + b_only, 0.5, alternative="two-sided").pvalue
    return McNemar(a_only, b_only, float(p_value))


def holm(p_values: Sequence[float], alpha: float) -> tuple[list[float], list[bool]]:
    """Holm-corrected p-values and whether each is significant at ``alpha``."""
    if not p_values:
        return [], []
    from statsmodels.stats.multitest import multipletests

    reject, corrected, _, _ = multipletests(list(p_values), alpha=alpha, method="holm")
    return [float(p) for p in corrected], [bool(r) for r in reject]


def pooled_difference(
    groups: Sequence[tuple[Sequence[str], Sequence[Sequence[str]], Sequence[Sequence[str]]]],
    settings: StatisticsSettings,
    labels: Sequence[str] = LABELS,
) -> Difference:
    """Across the samples of a study grid: the mean over samples of (mean macro F1 of a's
    runs minus that of b's runs) on each sample's tweets.

    ``groups`` holds, per evaluation sample, its gold labels and the predictions of a's
    runs and of b's runs on it (several where few-shot seeds vary). The bootstrap
    resamples tweets within each sample (stratified), the same tweets for every run of
    that sample; the interval is the percentile one, the p-value as in
    :func:`paired_difference`.
    """
    k = len(labels)
    coded = [
        (
            label_codes(g, labels),
            [label_codes(p, labels) for p in a],
            [label_codes(p, labels) for p in b],
        )
        for g, a, b in groups
    ]

    def statistic(indices: list[np.ndarray]) -> np.ndarray:
        per_sample = []
        for (gold, runs_a, runs_b), idx in zip(coded, indices, strict=True):
            g = gold[idx]
            f_a = np.mean([scores(confusions(g, r[idx], k), labels)["f1_macro"] for r in runs_a], 0)
            f_b = np.mean([scores(confusions(g, r[idx], k), labels)["f1_macro"] for r in runs_b], 0)
            per_sample.append(f_a - f_b)
        return np.mean(per_sample, axis=0)

    observed = float(statistic([np.arange(len(g))[None] for g, _, _ in coded])[0])
    rng = np.random.default_rng(settings.seed)
    draws = []
    for start in range(0, settings.resamples, BATCH):
        size = min(BATCH, settings.resamples - start)
        draws.append(statistic([rng.integers(0, len(g), (size, len(g))) for g, _, _ in coded]))
    values = np.concatenate(draws)
    if np.all(values == 0) and observed == 0:
        return Difference(0.0, 0.0, 0.0, 0.0, 1.0)
    tail = (1 - settings.confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    below = (np.count_nonzero(values <= 0) + 1) / (values.size + 1)
    above = (np.count_nonzero(values >= 0) + 1) / (values.size + 1)
    return Difference(
        value=observed,
        low=float(low),
        high=float(high),
        se=float(values.std(ddof=1)),
        p_value=float(min(1.0, 2 * min(below, above))),
    )
