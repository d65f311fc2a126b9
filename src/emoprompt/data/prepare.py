"""The prepared splits: train and dev validated, a validation split held out of train.

:func:`prepare` is what rule ``prepare`` runs: it reads the raw splits
(:mod:`emoprompt.data.splits`), holds out the validation split with the seeded
stratified draw of :mod:`emoprompt.data.sampling`, and writes the three splits and the
record of their ids.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from emoprompt.data.leaks import Rows, split_leaks
from emoprompt.data.sampling import sample_indices
from emoprompt.data.splits import locate_splits, parse_split, write_split
from emoprompt.infra.files import atomic_open

log = logging.getLogger(__name__)


def split_validation(
    train: pd.DataFrame, size: int | float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out a seeded, stratified validation split of ``train``: (rest, validation).

    ``size`` is a share of the split (0 < size < 1) or a number of tweets; each class
    keeps its share (largest remainders), and within a class the tweets are drawn with
    ``random.Random(seed)``. Both parts keep the split's order. Tuned choices (fine-tuning
    settings, calibration, prompt variants, the probe's settings) are compared on the
    validation split; the test split serves only the final table.
    """
    count = round(size * len(train)) if isinstance(size, float) and size < 1 else int(size)
    if not 1 <= count < len(train):
        raise ValueError(
            f"validation size {size!r} gives {count} of the train split's {len(train)} tweets; "
            "give a share between 0 and 1 or a count below the split's size"
        )
    rows = set(sample_indices(train["label"].tolist(), count, "stratified", seed))
    held = [i in rows for i in range(len(train))]
    validation = train[held].reset_index(drop=True)
    rest = train[[not h for h in held]].reset_index(drop=True)
    return rest, validation


@dataclass(frozen=True)
class Prepared:
    """Where :func:`prepare` writes the three splits and the record of their ids."""

    train: str | os.PathLike[str]
    validation: str | os.PathLike[str]
    test: str | os.PathLike[str]
    ids: str | os.PathLike[str]

    @classmethod
    def in_folder(cls, folder: str | os.PathLike[str]) -> Prepared:
        """The workflow's names inside ``folder``: train/validation/test.tsv, split_ids.json."""
        folder = Path(folder)
        return cls(
            *(folder / f"{n}.tsv" for n in ("train", "validation", "test")),
            folder / "split_ids.json",
        )


def prepare(
    raw: str | os.PathLike[str],
    out: Prepared,
    *,
    validation_size: int | float = 0.1,
    seed: int = 0,
) -> dict[str, int]:
    """Validate the raw train/dev splits and write the canonical train, validation and
    test TSVs, and the ids of each split as JSON (``out.ids``).

    The dev split is the test split: the shared task's test labels were never public.
    The validation split is a seeded, stratified part of train (:func:`split_validation`);
    ``train`` is the rest, which is all that few-shot examples, fine-tuning and the
    baseline ever see.
    """
    splits = locate_splits(raw)
    frames = {name: parse_split(split) for name, split in splits.items()}
    rest, validation = split_validation(frames["train"], validation_size, seed)
    parts = {"train": rest, "validation": validation, "test": frames["dev"]}
    # Before anything is written: a test tweet that is also in train or validation.
    places = frames["train"].attrs["places"]
    checked = {
        "train": Rows("train", rest, [places[i] for i in rest["id"]]),
        "validation": Rows("validation", validation, [places[i] for i in validation["id"]]),
        "test": Rows("test", frames["dev"], list(frames["dev"].attrs["places"].values())),
    }
    for warning in split_leaks(checked):
        log.warning("%s", warning)
    for name, frame in parts.items():
        write_split(frame, getattr(out, name))
    record = {
        "validation": {"size": validation_size, "seed": seed, "scheme": "stratified"},
        **{f"{name}_ids": frame["id"].tolist() for name, frame in parts.items()},
    }
    with atomic_open(out.ids) as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")
    return {name: len(frame) for name, frame in parts.items()}
