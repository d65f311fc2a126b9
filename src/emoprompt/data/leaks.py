"""Tweets shared between splits: the same id, or the same text once whitespace is
normalised. A tweet of the test split (or of the evaluation sample) that is also in a
split the model learns or is tuned from would make the score a memory test; it stops
the job, naming the file and line of both rows. Repeated texts inside train are counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from emoprompt.data.splits import DataError

#: Shared rows listed in a message before "... and N more".
SHOWN = 5


@dataclass(frozen=True)
class Rows:
    """A split to check: its name, its rows, and where each row is (file, line)."""

    name: str
    frame: pd.DataFrame
    places: Sequence[str]  # "file, line N" of each row, in order

    @classmethod
    def of_file(cls, name: str, frame: pd.DataFrame, path: str, first_line: int = 2) -> Rows:
        """Rows of a file that holds one row a line after its header."""
        return cls(name, frame, [f"{path}, line {first_line + i}" for i in range(len(frame))])


@dataclass(frozen=True)
class Leak:
    """One row of split ``a`` that is also in split ``b``, by id or by text."""

    by: str  # "id" | "text"
    a: str
    b: str
    where_a: str
    where_b: str
    value: str

    def __str__(self) -> str:
        shown = self.value if len(self.value) <= 60 else self.value[:57] + "..."
        return f"{self.where_a} and {self.where_b}: same {self.by} ({shown!r})"


def normal_text(text: str) -> str:
    """The text compared: runs of whitespace as one space, no leading or trailing space."""
    return re.sub(r"\s+", " ", text).strip()


def _index(rows: Rows, by: str) -> dict[str, str]:
    column = rows.frame["id"] if by == "id" else rows.frame["tweet"].map(normal_text)
    index: dict[str, str] = {}
    for value, place in zip(column, rows.places, strict=True):
        index.setdefault(value, place)
    return index


def shared_rows(a: Rows, b: Rows, by: Sequence[str] = ("id", "text")) -> list[Leak]:
    """Every row of ``a`` whose id or normalised text (``by``) is also in ``b``."""
    leaks = []
    for key in by:
        other = _index(b, key)
        for value, place in _index(a, key).items():
            if value in other:
                leaks.append(Leak(key, a.name, b.name, place, other[value], value))
    return leaks


def repeated_texts(rows: Rows) -> int:
    """Rows of a split whose normalised text an earlier row of it already has."""
    return int(rows.frame["tweet"].map(normal_text).duplicated().sum())


def refuse_leaks(
    pairs: Iterable[tuple[Rows, Rows]], what: str, by: Sequence[str] = ("id", "text")
) -> None:
    """Stop (:class:`DataError`) when any pair shares a row, listing where both are."""
    leaks = [leak for a, b in pairs for leak in shared_rows(a, b, by)]
    if not leaks:
        return
    lines = [f"  {leak}" for leak in leaks[:SHOWN]]
    if len(leaks) > SHOWN:
        lines.append(f"  ... and {len(leaks) - SHOWN} more")
    names = sorted({f"{leak.a} and {leak.b}" for leak in leaks})
    raise DataError(
        f"{len(leaks)} tweet(s) are in both {' / '.join(names)}: {what}\n" + "\n".join(lines)
    )


def split_leaks(splits: Mapping[str, Rows]) -> list[str]:
    """Refuse a test tweet that is also in train or validation; return warnings: texts
    repeated inside train, and train tweets repeated in validation (the same repeats,
    split apart by the validation draw). ``splits``: train, validation and test."""
    train, validation, test = (splits[n] for n in ("train", "validation", "test"))
    refuse_leaks(
        [(test, train), (test, validation)],
        "the test split would score tweets the model learnt or was tuned on; remove them "
        "from one of the files",
    )
    repeats = repeated_texts(train) + repeated_texts(validation)
    repeats += len(shared_rows(validation, train))
    if not repeats:
        return []
    return [
        f"{repeats} tweet text(s) of the train file are repeated in it (after whitespace "
        "normalisation); kept as they are"
    ]
