"""Shared fixtures: the local copy of the EmoEvalEs data and a scratch copy of the workflow."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from emoevales_copy import NoCopy, data_copy

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TORCH_THREADS = torch.get_num_threads()  # this process's own, before any test sets it

pytest_plugins = ("fixtures_models",)


@pytest.fixture(autouse=True)
def _torch_threads():
    """A test that runs a job in this process sets torch's threads to the job's
    (``configure_cpu``; in the workflow the job's process ends with it): every later
    test gets the process's own count back rather than inheriting, say, one thread."""
    yield
    if torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """A copy of EmoEvalEs (the zip and the TSVs): EMOEVALES_DIR, a local copy, or the
    product's download of the configured source into .cache/ (tests/emoevales_copy.py)."""
    try:
        return data_copy(REPO)
    except NoCopy as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def workflow_dir(tmp_path: Path) -> Path:
    """A scratch copy of the workflow (Snakefile, config, rules, prompts) to run or edit."""
    return copy_workflow(tmp_path / "wf")


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow (Snakefile, config, rules, prompts) into a new folder ``dest``."""
    dest.mkdir()
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("workflow", "prompts"):
        if (REPO / name).exists():
            shutil.copytree(REPO / name, dest / name)
    (dest / "src").symlink_to(REPO / "src")
    return dest


def run_snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the venv's snakemake in ``workdir``; on failure show its output."""
    result = subprocess.run(
        [str(BIN / "snakemake"), "--cores", "2", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout}\n{result.stderr}")
    return result
