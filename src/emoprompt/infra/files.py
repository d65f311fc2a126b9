"""Writing outputs so that a failed or interrupted job leaves nothing half-written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from emoprompt.infra.errors import DiskFull, check_space, is_disk_full


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it into place only on success.

    Works for files and folders alike: the caller creates whatever it likes at the
    yielded path. On an exception the temporary path is removed and ``target`` is
    left as it was.
    """
    target = Path(target)
    tmp = target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        check_space(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
        shutil.rmtree(tmp)  # the caller decides whether it becomes a file or a folder
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as exc:
        if is_disk_full(exc) and not isinstance(exc, DiskFull):
            raise DiskFull(target) from exc
        raise
    finally:
        if tmp != target and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp != target and tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(
    target: str | os.PathLike[str], mode: str = "w", **kwargs: Any
) -> Iterator[IO[Any]]:
    """``open()`` for writing whose result appears at ``target`` only when complete."""
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle


def write_json(target: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON, atomically."""
    with atomic_open(target) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
