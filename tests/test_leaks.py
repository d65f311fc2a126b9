"""Tweets shared between splits: a test tweet also in train or validation (by id or by
text) stops prepare, naming file and line of both rows; repeats inside train warn."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from emoprompt.data.prepare import Prepared, prepare, split_validation
from emoprompt.data.sampling import write_sample
from emoprompt.data.splits import DataError, locate_splits, parse_split, read_split, write_split

EMOTIONS = ["joy", "sadness", "disgust", "anger", "fear", "surprise", "others"]


def raw_folder(tmp_path: Path, dev_rows: list[tuple[str, str]], train_extra=()) -> Path:
    """train.csv with 70 tweets (t0..t69, 10 per class) and dev.csv with ``dev_rows``."""
    folder = tmp_path / "raw"
    folder.mkdir(parents=True)
    train = [(f"t{i}", f"tuit de entrenamiento {i}") for i in range(70)] + list(train_extra)
    for name, rows in (("train", train), ("dev", dev_rows)):
        body = "".join(
            f"{i},ev,{text},NO,{EMOTIONS[n % 7]}\n" for n, (i, text) in enumerate(rows)
        )
        (folder / f"{name}.csv").write_text("id,event,tweet,offensive,emotion\n" + body)
    return folder


def validation_id(folder: Path) -> str:
    """An id of train that the default validation draw (10%, seed 0) holds out."""
    train = parse_split(locate_splits(folder)["train"])
    _, validation = split_validation(train, 0.1, 0)
    return validation["id"].iloc[0]


def prepare_error(folder: Path, out: Path) -> str:
    with pytest.raises(DataError) as caught:
        prepare(folder, Prepared.in_folder(out))
    assert not out.exists() or not any(out.iterdir())  # nothing written
    return str(caught.value)


def test_a_dev_id_in_the_validation_part_of_train_stops_prepare_with_both_lines(tmp_path):
    probe = raw_folder(tmp_path / "a", [("d0", "otro tuit")])
    held = validation_id(probe)
    line = int(held[1:]) + 2  # t<n> is on line n + 2 of train.csv
    folder = raw_folder(tmp_path / "b", [("d0", "otro tuit"), (held, "un tuit distinto")])
    message = prepare_error(folder, tmp_path / "out")
    assert "test and validation" in message
    assert f"dev.csv, line 3 and {folder}/train.csv, line {line}: same id ('{held}')" in message


def test_a_dev_tweet_whose_text_is_in_train_stops_prepare_after_whitespace_is_normalised(
    tmp_path,
):
    folder = raw_folder(tmp_path, [("d0", "otro tuit"), ("d1", "  tuit de  entrenamiento 5 ")])
    message = prepare_error(folder, tmp_path / "out")
    assert "dev.csv, line 3 and" in message and "train.csv, line 7: same text" in message


def test_repeats_inside_train_are_a_warning_with_their_count(tmp_path, caplog):
    extra = [("x1", "tuit de entrenamiento 3"), ("x2", "tuit de  entrenamiento 4")]
    folder = raw_folder(tmp_path, [("d0", "otro tuit")], train_extra=extra)
    with caplog.at_level(logging.WARNING):
        counts = prepare(folder, Prepared.in_folder(tmp_path / "out"))
    assert counts["test"] == 1
    assert "2 tweet text(s) of the train file are repeated in it" in caplog.text


def test_a_sample_of_a_split_edited_to_hold_a_train_tweet_is_refused(tmp_path):
    folder = raw_folder(tmp_path, [(f"d{i}", f"prueba {i}") for i in range(14)])
    out = tmp_path / "out"
    prepare(folder, Prepared.in_folder(out))
    test = read_split(out / "test.tsv")
    train = read_split(out / "train.tsv")
    test.loc[3, "tweet"] = train.loc[0, "tweet"]  # edited after prepare
    write_split(test, out / "test.tsv")
    with pytest.raises(DataError, match=r"test.tsv, line 5 and .*train.tsv, line 2: same text"):
        write_sample(str(out / "train.tsv"), str(out / "test.tsv"), str(tmp_path / "s.tsv"),
                     str(tmp_path / "d.tsv"), size="all", scheme="random", seed=0)  # fmt: skip
    assert not (tmp_path / "s.tsv").exists()
