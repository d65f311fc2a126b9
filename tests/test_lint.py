"""Code and workflow hygiene: ruff, snakefmt and snakemake --lint must be clean."""

from __future__ import annotations

import subprocess

from conftest import BIN, REPO


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


def test_ruff_is_clean():
    result = run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt_is_clean():
    result = run(str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules")
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakemake_lint_reports_nothing():
    result = run(str(BIN / "snakemake"), "--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr, result.stdout + result.stderr
