"""The seeded evaluation sample of the test split and its class counts."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from emoprompt.data.leaks import Rows, refuse_leaks
from emoprompt.data.splits import read_split, write_split
from emoprompt.infra.errors import UserError
from emoprompt.infra.files import atomic_open
from emoprompt.labels import LABELS

SCHEMES = ("random", "stratified")


def parse_size(size: int | str, available: int) -> int:
    """Turn the ``sample_size`` setting (a positive integer or "all") into a count."""
    if isinstance(size, str):
        if size.strip().lower() == "all":
            return available
        if not size.strip().isdigit():
            raise ValueError(f"sample_size must be a positive integer or 'all', not {size!r}")
        size = int(size)
    if size < 1:
        raise ValueError(f"sample_size must be at least 1, not {size}")
    if size > available:
        raise ValueError(f"sample_size {size} is larger than the test split ({available} tweets)")
    return size


def _stratified_counts(labels: Sequence[str], size: int) -> dict[str, int]:
    """Per-class counts proportional to the split, rounded by largest remainder."""
    counts = Counter(labels)
    total = len(labels)
    order = [label for label in LABELS if label in counts] + sorted(set(counts) - set(LABELS))
    exact = {label: size * counts[label] / total for label in order}
    taken = {label: int(exact[label]) for label in order}
    # Largest remainder first; ties go to the class listed first, so the result is stable.
    by_remainder = sorted(order, key=lambda label: -(exact[label] - taken[label]))
    for label in by_remainder[: size - sum(taken.values())]:
        taken[label] += 1
    return taken


def sample_indices(labels: Sequence[str], size: int | str, scheme: str, seed: int) -> list[int]:
    """Row positions of the evaluation sample, in the split's order.

    ``random`` draws ``random.Random(seed).sample(range(n), size)``; ``stratified`` keeps
    each class's share of the split (largest-remainder rounding) and draws within each
    class with the same seeded generator. The same seed always gives the same rows.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"sample_scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    n = parse_size(size, len(labels))
    rng = random.Random(seed)
    if scheme == "random":
        return sorted(rng.sample(range(len(labels)), n))
    chosen: list[int] = []
    for label, count in _stratified_counts(labels, n).items():
        rows = [i for i, value in enumerate(labels) if value == label]
        chosen.extend(rng.sample(rows, count))
    return sorted(chosen)


def sample_split(test: pd.DataFrame, size: int | str, scheme: str, seed: int) -> pd.DataFrame:
    """The evaluation sample of a canonical test split."""
    rows = sample_indices(test["label"].tolist(), size, scheme, seed)
    return test.iloc[rows].reset_index(drop=True)


def class_distribution(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Counts and shares per class (rows in label order) for each named split."""
    table = pd.DataFrame({"label": list(LABELS)})
    for name, frame in splits.items():
        counts = frame["label"].value_counts()
        table[name] = [int(counts.get(label, 0)) for label in LABELS]
        table[f"{name}_share"] = (table[name] / max(len(frame), 1)).round(4)
    return table


def write_sample(
    train_path: str,
    test_path: str,
    sample_out: str,
    distribution_out: str,
    *,
    size: int | str,
    scheme: str,
    seed: int,
) -> pd.DataFrame:
    """Draw the evaluation sample from prepared splits; write it and the class counts."""
    train, test = read_split(train_path), read_split(test_path)
    rows = sample_indices(test["label"].tolist(), size, scheme, seed)
    sample = test.iloc[rows].reset_index(drop=True)
    # The prepared files were checked by prepare; this catches a split edited since. A
    # sample of the validation split may repeat a text that the train file repeats.
    drawn = Rows("evaluation sample", sample, [f"{test_path}, line {i + 2}" for i in rows])
    refuse_leaks(
        [(drawn, Rows.of_file("train", train, train_path))],
        "the sample would score tweets the model learnt from",
        by=("id",) if Path(test_path).stem == "validation" else ("id", "text"),
    )
    write_split(sample, sample_out)
    table = class_distribution({"train": train, "test": test, "sample": sample})
    with atomic_open(distribution_out) as handle:
        table.to_csv(handle, sep="\t", index=False, lineterminator="\n")
    return table


def write_validation_sample(
    validation_path: str, sample_path: str, out: str, *, size: int | str, seed: int
) -> pd.DataFrame:
    """The validation tweets a prompt family's variants are chosen on: a seeded sample
    of the validation split, none of them in the evaluation sample (which is drawn from
    the validation split too with ``evaluation_split: validation``)."""
    validation, sample = read_split(validation_path), read_split(sample_path)
    pool = validation[~validation["id"].isin(set(sample["id"]))].reset_index(drop=True)
    try:
        rows = sample_indices(pool["label"].tolist(), size, "random", seed)
    except ValueError:
        raise UserError(
            f"prompt_variants.validation_size is {size!r}, but {validation_path} less the "
            f"evaluation sample has {len(pool)} tweets"
        ) from None
    chosen = pool.iloc[rows].reset_index(drop=True)
    write_split(chosen, out)
    return chosen


def benchmark_sample(test: pd.DataFrame, n: int = 100, seed: int = 0) -> pd.DataFrame:
    """The benchmarks' tweets: ``random.Random(seed).sample`` of ``n`` row positions of
    the test split, in that order (``make bench`` and the GPU check draw the same)."""
    if not 0 < n <= len(test):
        raise ValueError(f"cannot sample {n} tweets from a split of {len(test)}")
    rows = random.Random(seed).sample(range(len(test)), n)
    return test.iloc[rows].reset_index(drop=True)
