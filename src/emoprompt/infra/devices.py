"""One GPU per job on a workstation with several: each GPU job claims a free device.

Snakemake counts GPUs (``--resources gpu=N`` lets at most N jobs that need one run at
once) but does not say *which* device a job gets. A job of the ``local-gpus`` profile
(resource ``pin_gpu=1``) therefore claims one itself, before CUDA starts: it takes an
exclusive ``flock`` on ``<lock dir>/gpu<id>.lock`` for the first device whose lock is
free and sets ``CUDA_VISIBLE_DEVICES`` to that id. The operating system releases the
lock when the job ends, however it ends, so a crashed job never keeps a device.

The devices to share out are those of ``CUDA_VISIBLE_DEVICES`` when it is set (so a user
can reserve some), else every NVIDIA GPU of the machine (``/proc/driver/nvidia/gpus``);
nothing here starts CUDA. Under SLURM (``SLURM_JOB_ID`` set) nothing is claimed: SLURM
has already given the job its device.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

LOCK_DIR = ".snakemake/gpu-locks"
NVIDIA_GPUS = "/proc/driver/nvidia/gpus"
PIN_RESOURCE = "pin_gpu"


def visible_devices(
    environ: Mapping[str, str] | None = None, nvidia_dir: str | os.PathLike[str] = NVIDIA_GPUS
) -> list[str]:
    """The device ids a job may be given: ``CUDA_VISIBLE_DEVICES``, else one per GPU."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    folder = Path(nvidia_dir)
    count = len(list(folder.iterdir())) if folder.is_dir() else 0
    return [str(i) for i in range(count)]


def _try_lock(path: Path) -> TextIO | None:
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - kept open while the lock is held
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def claim_device(
    devices: Sequence[str],
    lock_dir: str | os.PathLike[str] = LOCK_DIR,
    *,
    timeout: float | None = None,
    poll: float = 2.0,
) -> tuple[str, TextIO]:
    """Lock the first free device of ``devices``; wait while all are taken.

    Returns the device id and the open lock file: the device is this process's until
    the file is closed (or the process ends). Raises ``TimeoutError`` after ``timeout``
    seconds (None: wait as long as it takes) and ``ValueError`` when ``devices`` is empty.
    """
    if not devices:
        raise ValueError("no GPU to claim: CUDA_VISIBLE_DEVICES is empty and no GPU was found")
    folder = Path(lock_dir)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    waited_note = False
    while True:
        for device in devices:
            handle = _try_lock(folder / f"gpu{device}.lock")
            if handle is not None:
                return device, handle
        if timeout is not None and time.monotonic() - start >= timeout:
            raise TimeoutError(f"all GPUs ({', '.join(devices)}) stayed busy for {timeout:g} s")
        if not waited_note:
            log.info("all GPUs (%s) are taken; waiting for one", ", ".join(devices))
            waited_note = True
        time.sleep(poll)


@contextlib.contextmanager
def pinned_gpu(
    lock_dir: str | os.PathLike[str] = LOCK_DIR,
    environ: MutableMapping[str, str] | None = None,
    *,
    nvidia_dir: str | os.PathLike[str] = NVIDIA_GPUS,
    timeout: float | None = None,
    poll: float = 2.0,
) -> Iterator[str | None]:
    """Within the block, ``CUDA_VISIBLE_DEVICES`` names one device that no other job holds.

    Yields that device id, or None (and changes nothing) under SLURM or without a GPU.
    """
    environ = os.environ if environ is None else environ
    if environ.get("SLURM_JOB_ID"):
        log.info("SLURM job %s: the device is SLURM's choice", environ["SLURM_JOB_ID"])
        yield None
        return
    devices = visible_devices(environ, nvidia_dir)
    if not devices:
        log.info("no GPU on this machine: nothing to pin")
        yield None
        return
    device, handle = claim_device(devices, lock_dir, timeout=timeout, poll=poll)
    previous = environ.get("CUDA_VISIBLE_DEVICES")
    environ["CUDA_VISIBLE_DEVICES"] = device
    log.info("this job has GPU %s (CUDA_VISIBLE_DEVICES=%s)", device, device)
    try:
        yield device
    finally:
        if previous is None:
            environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            environ["CUDA_VISIBLE_DEVICES"] = previous
        handle.close()


def job_gpu(resources: Mapping[str, Any], lock_dir: str | os.PathLike[str] = LOCK_DIR):
    """:func:`pinned_gpu` for a job whose resources ask for it (``pin_gpu=1``, set by the
    ``local-gpus`` profile); otherwise a block that changes nothing."""
    if resources.get(PIN_RESOURCE):
        return pinned_gpu(lock_dir)
    return contextlib.nullcontext()
