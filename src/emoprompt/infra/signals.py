"""Stopping promptly: an interrupted workflow stops its running jobs, and a job that is
told to stop leaves nothing half-written and says so.

Snakemake itself treats SIGTERM as "finish the running jobs, then exit", and SIGINT stops
its jobs only when the terminal sends it to the whole process group (Ctrl-C); a SIGTERM
or SIGINT sent to the Snakemake process alone left a long job running for minutes.
:func:`stop_jobs_on_termination` (called from the Snakefile's ``onstart``) makes both
signals stop the running jobs at once; :func:`interruptible` (around each job's work)
turns SIGTERM into an exception, so that the job's temporary outputs are removed by
:func:`emoprompt.infra.files.atomic_path` and its log says it was interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)


class Interrupted(SystemExit):
    """The job was told to stop (SIGTERM or SIGINT)."""


def _descendants_terminate() -> int:
    """Send SIGTERM to every process this one started (its jobs and their children)."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    return len(children)


def stop_jobs_on_termination() -> None:
    """In the Snakemake process: SIGTERM and SIGINT stop the running jobs, then Snakemake
    (which marks their outputs incomplete and removes them)."""

    def handler(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        count = _descendants_terminate()
        print(f"{name}: stopping {count} running job process(es)", file=sys.stderr, flush=True)
        raise KeyboardInterrupt(name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """In a job: SIGTERM raises :class:`Interrupted` (exit status 143) instead of ending
    the process on the spot; SIGINT likewise (exit status 130)."""

    def handler(signum: int, frame) -> None:
        raise Interrupted(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except Interrupted as exc:
        log.error("interrupted (exit status %s): no output of this job was written", exc.code)
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
