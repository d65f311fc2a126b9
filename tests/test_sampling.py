"""The seeded evaluation sample."""

from __future__ import annotations

import random
from collections import Counter

import pandas as pd
import pytest

from emoprompt.data.sampling import class_distribution, sample_indices, sample_split
from emoprompt.labels import LABELS

# A split shaped like the real test split: skewed towards Otras and Alegría.
SHARES = dict(zip(LABELS, (181, 104, 16, 85, 9, 35, 414), strict=True))
GOLD = [label for label, count in SHARES.items() for _ in range(count)]
random.Random(1).shuffle(GOLD)


def test_random_sample_is_the_documented_draw():
    assert sample_indices(GOLD, 100, "random", 0) == sorted(
        random.Random(0).sample(range(844), 100)
    )


@pytest.mark.parametrize("scheme", ["random", "stratified"])
def test_same_seed_same_rows_other_seed_other_rows(scheme):
    first = sample_indices(GOLD, 100, scheme, 7)
    assert first == sample_indices(GOLD, 100, scheme, 7)
    assert first != sample_indices(GOLD, 100, scheme, 8)
    assert len(set(first)) == 100


def test_stratified_keeps_each_class_share():
    rows = sample_indices(GOLD, 100, "stratified", 0)
    counts = Counter(GOLD[i] for i in rows)
    for label, count in SHARES.items():
        assert abs(counts[label] - 100 * count / len(GOLD)) < 1
    assert sum(counts.values()) == 100


def test_all_and_string_sizes():
    assert sample_indices(GOLD, "all", "random", 3) == list(range(len(GOLD)))
    assert len(sample_indices(GOLD, "25", "stratified", 3)) == 25


@pytest.mark.parametrize(
    ("size", "scheme", "message"),
    [
        (845, "random", "larger than the test split"),
        (0, "random", "at least 1"),
        ("many", "random", "positive integer or 'all'"),
        (10, "clustered", "sample_scheme must be one of"),
    ],
)
def test_bad_settings_are_refused(size, scheme, message):
    with pytest.raises(ValueError, match=message):
        sample_indices(GOLD, size, scheme, 0)


def test_sample_split_and_distribution_table():
    test = pd.DataFrame({"id": [str(i) for i in range(len(GOLD))], "label": GOLD})
    sample = sample_split(test, 50, "random", 0)
    assert len(sample) == 50 and sample["id"].is_unique
    table = class_distribution({"test": test, "sample": sample})
    assert table["label"].tolist() == list(LABELS)
    assert table["test"].tolist() == list(SHARES.values())
    assert table["sample"].sum() == 50
    assert table["test_share"].sum() == pytest.approx(1, abs=1e-3)
