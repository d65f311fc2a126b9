"""What produced a result: the versions of Python and the libraries that computed it."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("emoprompt", "torch", "transformers", "scikit-learn", "numpy", "pandas")


def library_versions(extra: Sequence[str] = ()) -> dict[str, str]:
    """Python's version and each installed package's of ``PACKAGES`` and ``extra``."""
    versions = {"python": platform.python_version()}
    for name in (*PACKAGES, *extra):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions
