"""What produced a result: the versions of Python and the libraries that computed it, and
the commit of the workflow."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

PACKAGES = (
    "emoprompt",
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "peft",
    "bitsandbytes",
    "safetensors",
    "scikit-learn",
    "numpy",
    "pandas",
)


def library_versions(extra: Sequence[str] = ()) -> dict[str, str]:
    """Python's version, each installed package's of ``PACKAGES`` and ``extra``, and the
    CUDA that torch was built with (where it was)."""
    versions = {"python": platform.python_version()}
    for name in dict.fromkeys((*PACKAGES, *extra)):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    with contextlib.suppress(ImportError):
        import torch

        if torch.version.cuda:
            versions["cuda"] = str(torch.version.cuda)
    return versions


def git_commit(folder: str | os.PathLike[str]) -> str:
    """``git rev-parse HEAD`` of the checkout holding ``folder``; "unknown" if there is none."""
    try:
        result = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else "unknown"
