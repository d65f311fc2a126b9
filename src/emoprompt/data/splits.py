"""Reading, validating and writing the EmoEvalEs splits.

The splits come as comma-separated ``.csv`` (the course's zip) or tab-separated
``.tsv`` (the shared task's and the EmoEvent repository's files), with the header
``id,event,tweet,offensive,emotion``. Both are read with the standard CSV rules
(quoted fields may hold the delimiter, quotes and newlines), so that the physical
line on which each record starts is known and every error can name it.
"""

from __future__ import annotations

import csv
import io
import os
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from emoprompt.infra.errors import UserError
from emoprompt.infra.files import atomic_open
from emoprompt.labels import to_spanish

SOURCE_COLUMNS: tuple[str, ...] = ("id", "event", "tweet", "offensive", "emotion")
CANONICAL_COLUMNS: tuple[str, ...] = ("id", "event", "tweet", "offensive", "label")
DELIMITERS = {".csv": ",", ".tsv": "\t"}
# The course's CSV was made from the TSV without decoding the TSV's quoting, so a
# tweet that holds quotes arrives as a literal quoted field: "a ""b"" c". A field
# with that exact shape (and a doubled quote inside) is decoded once more so that
# both forms of the data give the same text.
_DOUBLE_QUOTED = re.compile(r'"((?:[^"]|"")*""(?:[^"]|"")*)"', re.DOTALL)
MAX_REPORTED_ERRORS = 20


class DataError(UserError, ValueError):
    """Malformed input: the message names the file, the line and the reason."""


@dataclass(frozen=True)
class SplitFile:
    """One split's raw bytes and where they came from (for error messages)."""

    name: str  # e.g. "data/raw/emoeval_data.zip::train.csv"
    suffix: str  # ".csv" or ".tsv"
    data: bytes


def undo_double_quoting(text: str) -> str:
    """Decode a field that still carries a second layer of CSV quoting."""
    match = _DOUBLE_QUOTED.fullmatch(text)
    return match.group(1).replace('""', '"') if match else text


def _split_of(member: str) -> tuple[str, str] | None:
    """Return (split, suffix) for a member name like ``x/train.csv``; None otherwise."""
    path = PurePosixPath(member)
    if path.name.startswith(".") or "__MACOSX" in path.parts:
        return None
    suffix = path.suffix.lower()
    if suffix not in DELIMITERS:
        return None
    stem = path.stem.lower()
    return (stem, suffix) if stem in ("train", "dev") else None


def _pick(found: dict[str, list[tuple[str, str]]], where: str) -> dict[str, tuple[str, str]]:
    chosen = {}
    for split in ("train", "dev"):
        candidates = found.get(split, [])
        if not candidates:
            raise DataError(f"{where}: no {split} split (expected {split}.csv or {split}.tsv)")
        if len(candidates) > 1:
            names = ", ".join(sorted(name for name, _ in candidates))
            raise DataError(f"{where}: more than one {split} split ({names}); keep only one")
        chosen[split] = candidates[0]
    return chosen


def locate_splits(raw: str | os.PathLike[str]) -> dict[str, SplitFile]:
    """Find the train and dev files in a zip archive or a folder and read their bytes."""
    raw = Path(raw)
    found: dict[str, list[tuple[str, str]]] = {}
    if raw.is_dir():
        for path in sorted(raw.rglob("*")):
            hit = _split_of(path.relative_to(raw).as_posix()) if path.is_file() else None
            if hit:
                found.setdefault(hit[0], []).append((str(path), hit[1]))
        chosen = _pick(found, str(raw))
        return {s: SplitFile(n, suf, Path(n).read_bytes()) for s, (n, suf) in chosen.items()}
    if not zipfile.is_zipfile(raw):
        raise DataError(f"{raw}: not a zip archive and not a folder")
    with zipfile.ZipFile(raw) as archive:
        for member in archive.namelist():
            hit = _split_of(member)
            if hit:
                found.setdefault(hit[0], []).append((member, hit[1]))
        chosen = _pick(found, str(raw))
        return {s: SplitFile(f"{raw}::{m}", suf, archive.read(m)) for s, (m, suf) in chosen.items()}


def _records(split: SplitFile) -> Iterable[tuple[int, list[str]]]:
    """Yield (line number where the record starts, fields), header first."""
    try:
        text = split.data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = split.data[: exc.start].count(b"\n") + 1
        raise DataError(f"{split.name}, line {line}: not valid UTF-8 ({exc.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=DELIMITERS[split.suffix])
    start = 1
    try:
        for fields in reader:
            yield start, fields
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{split.name}, line {start}: {exc}") from None


def parse_split(split: SplitFile) -> pd.DataFrame:
    """Parse and validate one split into the canonical columns (Spanish labels).

    Every problem is reported with its line; nothing is dropped or repaired silently.
    """
    records = iter(_records(split))
    try:
        _, header = next(records)
    except StopIteration:
        raise DataError(f"{split.name}, line 1: the file is empty") from None
    header = [name.strip().lower() for name in header]
    # The source files call the class "emotion"; a file that calls it "label" works too.
    label_column = "label" if "label" in header and "emotion" not in header else "emotion"
    required = [c if c != "emotion" else label_column for c in SOURCE_COLUMNS]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{split.name}, line 1: missing column(s) {', '.join(missing)} "
            f"(header is {', '.join(header)})"
        )
    position = {name: header.index(name) for name in required}

    errors: list[str] = []
    rows: list[tuple[str, ...]] = []
    first_line_of: dict[str, int] = {}
    for line, fields in records:
        problem = None
        if len(fields) != len(header):
            problem = f"expected {len(header)} fields, found {len(fields)}"
        else:
            values = {name: fields[i].strip() for name, i in position.items()}
            tweet = undo_double_quoting(fields[position["tweet"]])
            if not values["id"]:
                problem = "empty id"
            elif values["id"] in first_line_of:
                problem = (
                    f"duplicate id {values['id']} (first on line {first_line_of[values['id']]})"
                )
            elif not tweet.strip():
                problem = "empty tweet"
            else:
                try:
                    label = to_spanish(values[label_column])
                except ValueError as exc:
                    problem = str(exc)
        if problem:
            errors.append(f"{split.name}, line {line}: {problem}")
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
            continue
        first_line_of[values["id"]] = line
        rows.append((values["id"], values["event"], tweet, values["offensive"], label))
    if errors:
        stopped = len(errors) >= MAX_REPORTED_ERRORS
        more = f" (stopped after the first {MAX_REPORTED_ERRORS})" if stopped else ""
        raise DataError(f"{len(errors)} problem(s) in {split.name}{more}:\n" + "\n".join(errors))
    if not rows:
        raise DataError(f"{split.name}: no data rows after the header")
    frame = pd.DataFrame(rows, columns=list(CANONICAL_COLUMNS))
    # Where each row is, for messages about it (ids are unique within a split).
    frame.attrs["places"] = {i: f"{split.name}, line {n}" for i, n in first_line_of.items()}
    return frame


def write_split(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a canonical split as UTF-8 TSV with LF line ends, atomically."""
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(frame.columns)
        writer.writerows(frame.itertuples(index=False, name=None))


def read_split(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a split written by :func:`write_split` (all columns as strings)."""
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
