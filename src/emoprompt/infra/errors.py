"""Errors a user can fix (bad data, configuration, prompt or model files, a full disk):
one short message that names the file and what to do, without a traceback. Anything
else is a bug and keeps its traceback in the rule's log.

Each such error class of the package derives from :class:`UserError`;
:func:`report_user_errors` (installed by ``infra.logs.setup_logging`` in every job)
prints them as one line.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from pathlib import Path
from types import TracebackType

log = logging.getLogger("emoprompt")

#: Free bytes below which an output is not even started.
MIN_FREE_BYTES = 64 * 1024


class UserError(Exception):
    """An error in what the user gave; its message says which file and what to do."""


class DiskFull(UserError, OSError):
    """No space left where an output is written."""

    def __init__(self, path: str | os.PathLike[str]):
        folder = Path(path).parent
        super().__init__(
            errno.ENOSPC,
            f"no space left on the device to write {path}: free some space there "
            f"(df -h {folder}) and run again; no output was left half-written",
        )

    def __str__(self) -> str:
        return str(self.args[1])


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def check_space(path: str | os.PathLike[str]) -> None:
    """Refuse to start writing ``path`` on a device that has (next to) no space left."""
    folder = Path(path).parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # not measurable here: the write itself will tell
    if free < MIN_FREE_BYTES:
        raise DiskFull(path)


def _hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if isinstance(exc, UserError):
        log.error("%s", exc)
        return
    sys.__excepthook__(kind, exc, tb)


def report_user_errors() -> None:
    """An uncaught :class:`UserError` ends the process (exit status 1) with one log line."""
    sys.excepthook = _hook
