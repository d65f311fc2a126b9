"""Fetching the EmoEvalEs data: an http(s) URL, a local zip, or a local folder.

Whatever the source, the result appears at its destination only when it is complete
and verified (checksum when one is configured, a readable zip holding train and dev
splits); a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from tqdm import tqdm

from emoprompt.data.splits import DataError, locate_splits
from emoprompt.infra.errors import UserError
from emoprompt.infra.files import atomic_open, atomic_path, sha256_file

log = logging.getLogger(__name__)

DEFAULT_URL = (
    "https://www.fing.edu.uy/owncloud/index.php/s/cgbdFYX2te4zLrA/download/emoeval_data.zip"
)
# Client errors that may pass if asked again; every other 4xx is final.
_RETRYABLE_STATUS = {408, 425, 429}


class DownloadError(UserError, RuntimeError):
    """The data could not be fetched or did not verify; the message says why."""


@dataclass
class Provenance:
    """Where the raw data came from and what it was (written beside it)."""

    source: str
    kind: str  # "url", "zip" or "folder"
    sha256: str
    bytes: int
    retrieved_at: str
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256, for folders
    checksum_verified: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def source_kind(source: str) -> str:
    """Classify a data source string as "url", "zip" or "folder"."""
    scheme = urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        return "url"
    if scheme not in ("", "file") and len(scheme) > 1:  # one letter: a Windows drive
        raise DownloadError(f"data_source {source!r}: only http(s) URLs and local paths work")
    path = Path(source[7:] if scheme == "file" else source)
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "zip"
    raise DownloadError(f"data_source {source!r}: no such file or folder")


def redact(url: str) -> str:
    """A URL without user name, password or query string, fit for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


#: What a user without internet can do instead (README: Set-up).
OFFLINE_HINT = (
    "without internet, give a local copy of the data: make run DATA=/path/to/emoeval_data.zip "
    "(or a folder holding train and dev), or --config data_source=PATH"
)


def _stream_to(
    url: str, dest: Path, *, timeout: float, chunk_size: int = 1 << 16
) -> tuple[str, int]:
    """One attempt: stream ``url`` into ``dest``; return (sha256, size)."""
    digest = hashlib.sha256()
    size = 0
    with requests.get(url, stream=True, timeout=(min(timeout, 30.0), timeout)) as response:
        if response.status_code >= 400:
            raise requests.HTTPError(
                f"HTTP {response.status_code} {response.reason}", response=response
            )
        expected = response.headers.get("Content-Length")
        total = int(expected) if expected and expected.isdigit() else None
        with (
            open(dest, "wb") as handle,
            tqdm(total=total, unit="B", unit_scale=True, desc="download", mininterval=2.0) as bar,
        ):
            for chunk in response.iter_content(chunk_size):
                handle.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
    if total is not None and size != total:
        raise requests.ConnectionError(f"incomplete response: got {size} of {total} bytes")
    return digest.hexdigest(), size


def download_url(
    url: str, dest: Path, *, timeout: float = 60.0, retries: int = 3, backoff: float = 2.0
) -> tuple[str, int]:
    """Stream ``url`` into ``dest``, retrying transient failures; return (sha256, size)."""
    shown = redact(url)
    last = "no attempt made"
    for attempt in range(1, retries + 2):
        try:
            return _stream_to(url, dest, timeout=timeout)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            last = str(exc)
            if status is not None and status < 500 and status not in _RETRYABLE_STATUS:
                raise DownloadError(f"downloading {shown} failed: {last}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            last = f"{type(exc).__name__}: {exc}"
            if "NameResolutionError" in last or "Name or service not known" in last:
                host = urlsplit(url).hostname
                raise DownloadError(
                    f"downloading {shown} failed: the name {host} does not resolve (no "
                    f"network?); {OFFLINE_HINT}"
                ) from None
        except requests.RequestException as exc:  # e.g. ChunkedEncodingError on a cut stream
            last = f"{type(exc).__name__}: {exc}"
        if attempt <= retries:
            wait = backoff * 2 ** (attempt - 1)
            log.warning(
                "attempt %d for %s failed (%s); retrying in %.1f s", attempt, shown, last, wait
            )
            time.sleep(wait)
    if len(last) > 300:
        last = last[:297] + "..."
    raise DownloadError(
        f"downloading {shown} failed after {retries + 1} attempts: {last}; {OFFLINE_HINT}"
    )


def _check_archive(path: Path, shown: str) -> None:
    if not zipfile.is_zipfile(path):
        raise DownloadError(f"{shown} is not a zip archive")
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise DownloadError(f"{shown}: member {bad} is corrupt")
    try:
        locate_splits(path)
    except DataError as exc:
        raise DownloadError(f"{shown}: {exc}".replace(str(path), "the archive")) from None


def _check_sha256(actual: str, expected: str | None, shown: str) -> bool:
    if not expected:
        log.info("sha256 of %s: %s (set data_sha256 to pin it)", shown, actual)
        return False
    if actual.lower() != expected.strip().lower():
        raise DownloadError(
            f"checksum mismatch for {shown}: expected sha256 {expected.strip().lower()}, "
            f"got {actual}; the data changed or the download is corrupt"
        )
    log.info("sha256 of %s verified: %s", shown, actual)
    return True


def folder_digest(files: dict[str, str]) -> str:
    """The sha256 of a folder: of its ``sha256sum``-style listing, sorted by name."""
    listing = "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def fetch(
    source: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 2.0,
) -> Provenance:
    """Fetch the data ``source`` to ``dest`` (a zip file, or a folder for a folder source)."""
    dest = Path(dest)
    kind = source_kind(source)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    with atomic_path(dest) as tmp:
        if kind == "folder":
            splits = locate_splits(Path(source))
            tmp.mkdir()
            files = {}
            for split in splits.values():
                name = Path(split.name).name
                (tmp / name).write_bytes(split.data)
                files[name] = hashlib.sha256(split.data).hexdigest()
            digest, shown = folder_digest(files), os.path.abspath(source)
            size = sum(path.stat().st_size for path in tmp.iterdir())
        else:
            files = {}
            if kind == "url":
                shown = redact(source)
                digest, size = download_url(
                    source, tmp, timeout=timeout, retries=retries, backoff=backoff
                )
            else:
                shown = os.path.abspath(source)
                shutil.copyfile(source, tmp)
                digest, size = sha256_file(tmp), tmp.stat().st_size
            _check_archive(tmp, shown)
        verified = _check_sha256(digest, sha256, shown)
    return Provenance(
        source=shown,
        kind=kind,
        sha256=digest,
        bytes=size,
        retrieved_at=now,
        files=files,
        checksum_verified=verified,
    )


#: Where the workflow records the source of the raw copy in place (beside it).
RECORD = "data/raw/source.json"


def fetch_keeping_previous(
    source: str,
    dest: str | os.PathLike[str],
    record: str | os.PathLike[str],
    **options: Any,
) -> Provenance:
    """:func:`fetch`, for a workflow whose re-run must never lose the data it has: the
    new copy replaces ``dest`` only once complete and verified, and ``record`` (beside
    it) says where the copy in place came from. When the source changed and the new one
    cannot be fetched, the message says so and how to keep using the copy in place."""
    record = Path(record)
    try:
        previous = json.loads(record.read_text(encoding="utf-8"))["source"]
    except (OSError, ValueError, KeyError):
        previous = None
    try:
        provenance = fetch(source, dest, **options)
    except DownloadError as exc:
        if previous is None or previous == source or not Path(dest).exists():
            raise
        raise DownloadError(
            f"{exc}\ndata_source changed from {redact(previous)} to {redact(source)}; the "
            f"copy from the former is kept in {dest}: to go on with it, run with that source "
            f"again (make run DATA={redact(previous)}, or --config data_source=...)"
        ) from None
    with atomic_open(record) as handle:
        json.dump({"source": source, "sha256": provenance.sha256}, handle)
    return provenance
