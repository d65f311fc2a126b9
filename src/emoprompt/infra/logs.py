"""One logging set-up for every workflow step: the rule's log file and the terminal."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from emoprompt.infra.errors import report_user_errors

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Tee:
    """A text stream that writes to several streams (progress bars reach log and terminal)."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


def setup_logging(log_file: str | os.PathLike[str] | None, level: int = logging.INFO) -> None:
    """Send log records, warnings and progress bars (stderr) to ``log_file`` and the terminal."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.__stderr__)]
    if log_file is not None:
        os.makedirs(os.path.dirname(os.fspath(log_file)) or ".", exist_ok=True)
        stream = open(log_file, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the job
        handlers.append(logging.StreamHandler(stream))
        sys.stderr = _Tee(sys.__stderr__, stream)  # type: ignore[assignment]
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)
    logging.captureWarnings(True)
    report_user_errors()  # a user's mistake: one line; a bug: its traceback
