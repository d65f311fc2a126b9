"""Where the tests find EmoEvalEs, as a user's clone would: a local copy where one is
given, else the product's own download of the configured source into a cache, once.

A copy is a folder holding the course's ``emoeval_data.zip`` and the two splits as the
EmoEvent repository writes them (``train.tsv``, ``dev.tsv``), which the download
derives from the zip. ``EMOEVALES_DIR`` names a copy; ``EMOEVALES_LOCAL`` moves the one
looked for beside the checkout; ``EMOEVALES_URL`` replaces the configured source (a
mirror, or a local server in tests/test_data_copy.py); ``EMOEVALES_CACHE`` moves the cache.
"""

from __future__ import annotations

import csv
import io
import os
import zipfile
from pathlib import Path

import yaml

from emoprompt.data.download import DownloadError, fetch

ZIP = "emoeval_data.zip"
#: The course zip as distributed (config.yaml's comment on data_sha256).
COURSE_SHA256 = "9fcdb7f3b1500de6c17bc58fc929863179ab0dd03b96987783ca3ffc9af2680a"
SPLITS = ("train", "dev")
LOCAL = "{parent}/shared/data/emoevales"  # a copy beside the checkout, where one is kept


class NoCopy(RuntimeError):
    """No local copy and no download: the message says what to set."""


def _splits_from_zip(folder: Path) -> None:
    """train.tsv and dev.tsv from the zip's CSV files (tab-separated, as EmoEvent's)."""
    with zipfile.ZipFile(folder / ZIP) as archive:
        for name in SPLITS:
            text = archive.read(f"{name}.csv").decode("utf-8")
            rows = list(csv.reader(io.StringIO(text, newline="")))
            if any("\t" in cell or "\n" in cell for row in rows for cell in row):
                raise NoCopy(f"{folder / ZIP}: {name}.csv has a tab or newline inside a field")
            body = "".join("\t".join(row) + "\n" for row in rows)
            tmp = folder / f".{name}.tsv.part"
            tmp.write_text(body, encoding="utf-8", newline="")
            tmp.replace(folder / f"{name}.tsv")


def is_copy(folder: Path) -> bool:
    return (folder / ZIP).is_file() and all((folder / f"{n}.tsv").is_file() for n in SPLITS)


def find_or_fetch(
    *,
    given: str | None,
    beside: Path,
    cache: Path,
    config: Path,
    url: str | None = None,
) -> Path:
    """``given`` (EMOEVALES_DIR) when set; else the copy ``beside`` the checkout where
    there is one; else the cache, filled once by the product's download of ``url`` or of
    config.yaml's ``data_source``, checksum verified."""
    if given:
        if not is_copy(Path(given)):
            raise NoCopy(f"EMOEVALES_DIR={given} holds no {ZIP} with train.tsv and dev.tsv")
        return Path(given)
    if is_copy(beside):
        return beside
    if is_copy(cache):
        return cache
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    source = url or settings["data_source"]
    cache.mkdir(parents=True, exist_ok=True)
    try:
        fetch(source, cache / ZIP, sha256=settings.get("data_sha256") or COURSE_SHA256,
              timeout=30, retries=1, backoff=0.5)  # fmt: skip
    except DownloadError as exc:
        raise NoCopy(
            f"EmoEvalEs is needed by this test and there is no copy: {exc}. Set "
            f"EMOEVALES_DIR to a folder holding {ZIP}, train.tsv and dev.tsv, or "
            "EMOEVALES_URL to where the zip can be downloaded"
        ) from None
    _splits_from_zip(cache)
    return cache


def data_copy(repo: Path) -> Path:
    """The tests' copy of EmoEvalEs (see the module's docstring)."""
    return find_or_fetch(
        given=os.environ.get("EMOEVALES_DIR"),
        beside=Path(os.environ.get("EMOEVALES_LOCAL", LOCAL.format(parent=repo.parent))),
        cache=Path(os.environ.get("EMOEVALES_CACHE", repo / ".cache" / "emoevales")),
        config=repo / "config.yaml",
        url=os.environ.get("EMOEVALES_URL"),
    )
