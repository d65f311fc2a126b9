"""Reading and validating the splits: every malformed case names file, line and reason."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from emoprompt.data.prepare import Prepared, prepare, split_validation
from emoprompt.data.splits import (
    CANONICAL_COLUMNS,
    DataError,
    SplitFile,
    locate_splits,
    parse_split,
    read_split,
    undo_double_quoting,
    write_split,
)

HEADER = "id,event,tweet,offensive,emotion\n"


def csv_split(body: str, header: str = HEADER, name: str = "train.csv") -> SplitFile:
    return SplitFile(name, ".csv", (header + body).encode("utf-8"))


def error_of(split: SplitFile) -> str:
    with pytest.raises(DataError) as info:
        parse_split(split)
    return str(info.value)


def test_reads_a_valid_csv_with_spanish_labels():
    frame = parse_split(csv_split("1,ev,hola,NO,joy\n2,ev,adiós,OFF,others\n"))
    assert list(frame.columns) == list(CANONICAL_COLUMNS)
    assert frame["label"].tolist() == ["Alegría", "Otras"]
    assert frame["id"].tolist() == ["1", "2"]


@pytest.mark.parametrize(
    ("body", "line", "reason"),
    [
        ("1,ev,hola,NO,joy\n2,ev,extra,field,NO,joy\n", 3, "expected 5 fields, found 6"),
        ("1,ev,hola,NO,joy\n2,ev,NO,joy\n", 3, "expected 5 fields, found 4"),
        ("1,ev,hola,NO,joy\n2,ev,hola,NO,happiness\n", 3, "unknown label 'happiness'"),
        ("1,ev,hola,NO,joy\n2,ev,   ,NO,joy\n", 3, "empty tweet"),
        ("1,ev,hola,NO,joy\n,ev,hola,NO,joy\n", 3, "empty id"),
        (
            "1,ev,hola,NO,joy\n2,ev,b,NO,joy\n1,ev,c,NO,fear\n",
            4,
            "duplicate id 1 (first on line 2)",
        ),
        ("1,ev,hola,NO,joy\n\n2,ev,b,NO,joy\n", 3, "expected 5 fields, found 0"),
    ],
    ids=[
        "too-many-fields",
        "too-few-fields",
        "bad-label",
        "empty-tweet",
        "empty-id",
        "duplicate-id",
        "blank-line",
    ],
)
def test_malformed_rows_name_file_line_and_reason(body, line, reason):
    message = error_of(csv_split(body))
    assert f"train.csv, line {line}: {reason}" in message


def test_line_numbers_count_physical_lines_of_multiline_records():
    body = '1,ev,"dos\nlíneas, y coma",NO,joy\n2,ev,hola,NO,rabia\n'
    assert "train.csv, line 4: unknown label 'rabia'" in error_of(csv_split(body))


def test_missing_column_is_named():
    message = error_of(csv_split("1,ev,hola,NO\n", header="id,event,tweet,offensive\n"))
    assert "train.csv, line 1: missing column(s) emotion" in message


def test_every_problem_is_reported_not_only_the_first():
    message = error_of(csv_split("1,ev,hola,NO,joy\n2,ev,,NO,joy\n3,ev,x,NO,nope\n"))
    assert "line 3: empty tweet" in message and "line 4: unknown label" in message


def test_empty_file_and_header_only():
    assert "line 1: the file is empty" in error_of(SplitFile("dev.csv", ".csv", b""))
    assert "no data rows" in error_of(csv_split(""))


def test_invalid_utf8_names_the_line():
    data = (HEADER + "1,ev,hola,NO,joy\n2,ev,caf\xe9,NO,joy\n").encode("latin-1")
    assert "train.csv, line 3: not valid UTF-8" in error_of(SplitFile("train.csv", ".csv", data))


def test_bom_crlf_and_quoted_fields_read_correctly():
    text = (
        HEADER.replace("\n", "\r\n") + '1,ev,"uno, dos\r\ny tres",NO,sadness\r\n2,ev,b,NO,fear\r\n'
    )
    frame = parse_split(SplitFile("dev.csv", ".csv", b"\xef\xbb\xbf" + text.encode()))
    assert frame["id"].tolist() == ["1", "2"]  # the BOM did not stick to the first column name
    assert frame["tweet"][0] == "uno, dos\r\ny tres"
    assert frame["label"].tolist() == ["Tristeza", "Miedo"]


def test_tsv_uses_tabs_and_csv_quoting():
    data = 'id\tevent\ttweet\toffensive\temotion\n1\tev\t"dice ""hola"", y\tya"\tNO\tanger\n'
    frame = parse_split(SplitFile("dev.tsv", ".tsv", data.encode()))
    assert frame["tweet"][0] == 'dice "hola", y\tya'
    assert frame["label"][0] == "Ira"


def test_course_double_quoted_field_is_decoded_once_more():
    assert undo_double_quoting('"a ""b"" c"') == 'a "b" c'
    assert undo_double_quoting('"hola"') == '"hola"'  # a quoted tweet stays quoted
    assert undo_double_quoting("sin comillas") == "sin comillas"


def test_locate_splits_refuses_missing_and_ambiguous(tmp_path: Path):
    (tmp_path / "train.csv").write_text(HEADER)
    with pytest.raises(DataError, match="no dev split"):
        locate_splits(tmp_path)
    (tmp_path / "dev.csv").write_text(HEADER)
    (tmp_path / "dev.tsv").write_text(HEADER)
    with pytest.raises(DataError, match="more than one dev split"):
        locate_splits(tmp_path)


def test_zip_member_errors_name_the_archive_and_member(tmp_path: Path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/train.csv", HEADER + "1,ev,hola,NO,joy\n")
        zf.writestr("data/dev.csv", HEADER + "1,ev,hola,NO,joy,extra\n")
    with pytest.raises(DataError) as info:
        prepare(archive, Prepared.in_folder(tmp_path))
    assert f"{archive}::data/dev.csv, line 2: expected 5 fields, found 6" in str(info.value)
    assert not (tmp_path / "train.tsv").exists() and not (tmp_path / "test.tsv").exists()


def test_write_and_read_round_trip(tmp_path: Path):
    frame = parse_split(csv_split('1,ev,"a\tb ""c""\nd",NO,joy\n2,ev,0012,NO,others\n'))
    write_split(frame, tmp_path / "x.tsv")
    back = read_split(tmp_path / "x.tsv")
    assert back.equals(frame)


def test_real_data_counts_and_sources_agree(data_dir: Path, tmp_path: Path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    counts = prepare(data_dir / "emoeval_data.zip", Prepared.in_folder(tmp_path / "a"))
    assert counts == {"train": 5723 - 572, "validation": 572, "test": 844}
    prepare(data_dir, Prepared.in_folder(tmp_path / "b"))
    for split in ("train", "validation", "test", "split_ids"):
        suffix = "json" if split == "split_ids" else "tsv"
        zipped = (tmp_path / "a" / f"{split}.{suffix}").read_bytes()
        assert zipped == (tmp_path / "b" / f"{split}.{suffix}").read_bytes()
    tweets = read_split(tmp_path / "a" / "test.tsv")["tweet"]
    assert not tweets.str.contains('""').any()  # the course's extra quoting is gone


def test_validation_split_is_seeded_stratified_and_disjoint(data_dir: Path, tmp_path: Path):
    out = Prepared.in_folder(tmp_path)
    prepare(data_dir / "emoeval_data.zip", out, validation_size=0.1, seed=0)
    splits = {name: read_split(getattr(out, name)) for name in ("train", "validation", "test")}
    ids = {name: set(frame["id"]) for name, frame in splits.items()}
    assert not ids["train"] & ids["validation"]
    assert not ids["train"] & ids["test"] and not ids["validation"] & ids["test"]
    whole = pd.concat([splits["train"], splits["validation"]])
    assert len(whole) == 5723 and whole["id"].is_unique  # train is split, nothing lost
    # each class keeps its share of train (largest remainders: within one tweet)
    shares = whole["label"].value_counts() * 572 / 5723
    counts = splits["validation"]["label"].value_counts()
    assert ((counts - shares.reindex(counts.index)).abs() < 1).all()
    record = json.loads(Path(out.ids).read_text())
    assert record["validation"] == {"size": 0.1, "seed": 0, "scheme": "stratified"}
    for name, frame in splits.items():
        assert record[f"{name}_ids"] == frame["id"].tolist()
    # the same seed gives the same split; another seed another one; a count works too
    again, other = tmp_path / "again", tmp_path / "other"
    again.mkdir(), other.mkdir()
    prepare(data_dir / "emoeval_data.zip", Prepared.in_folder(again), validation_size=0.1, seed=0)
    assert (again / "validation.tsv").read_bytes() == Path(out.validation).read_bytes()
    rest, held = split_validation(whole.reset_index(drop=True), 300, seed=1)
    assert len(held) == 300 and set(held["id"]) != ids["validation"]
    assert not set(rest["id"]) & set(held["id"])
    with pytest.raises(ValueError, match="validation size"):
        split_validation(whole, 0, seed=0)
