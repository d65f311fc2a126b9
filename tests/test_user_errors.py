"""A mistake the user can fix is one short message naming the file and what to do, with
no traceback; a bug keeps its traceback in the rule's log; a full disk names the path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, run_snakemake

from emoprompt.infra.errors import DiskFull
from emoprompt.infra.files import atomic_open

JOB = """
from emoprompt.infra.logs import setup_logging
from emoprompt.data.splits import DataError
setup_logging({log!r})
raise {error}
"""


def run_job(tmp_path: Path, error: str) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "job.log"
    code = textwrap.dedent(JOB.format(log=str(log), error=error))
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=False)  # fmt: skip
    return result, log.read_text()


def test_a_data_error_is_one_line_in_the_log_and_on_the_terminal(tmp_path):
    result, log = run_job(tmp_path, "DataError(\"dev.tsv, line 4: unknown label 'neutral'\")")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Traceback" not in log
    assert log.count("dev.tsv, line 4: unknown label 'neutral'") == 1
    assert result.stderr.count("dev.tsv, line 4: unknown label 'neutral'") == 1


def test_a_bug_keeps_its_traceback_in_the_log(tmp_path):
    result, log = run_job(tmp_path, "KeyError('a bug')")
    assert result.returncode == 1
    assert "Traceback" in log and "KeyError: 'a bug'" in log


def test_a_bad_label_in_the_data_stops_the_workflow_with_one_line_and_no_traceback(
    workflow_dir, data_dir
):
    folder = workflow_dir / "raw"
    folder.mkdir()
    (folder / "train.tsv").write_text((data_dir / "train.tsv").read_text())
    lines = (data_dir / "dev.tsv").read_text().splitlines(keepends=True)
    fields = lines[3].split("\t")
    lines[3] = "\t".join([*fields[:-1], "neutral\n"])
    (folder / "dev.tsv").write_text("".join(lines))
    result = run_snakemake(workflow_dir, "data/processed/test.tsv", "--config",
                           f"data_source={folder}", check=False)  # fmt: skip
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "dev.tsv, line 4: unknown label 'neutral'" in output
    assert "Traceback" not in output
    assert not (workflow_dir / "data" / "processed" / "test.tsv").exists()


def test_a_full_disk_names_the_output_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                             capture_output=True, text=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"a small tmpfs cannot be mounted here: {mounted.stderr.strip()}")
    try:
        target = small / "results" / "figure.png"
        with pytest.raises(DiskFull) as caught, atomic_open(target, "wb") as handle:
            handle.write(b"x" * (2 << 20))
        assert f"no space left on the device to write {target}" in str(caught.value)
        assert list((small / "results").iterdir()) == []
        (small / "filler").write_bytes(b"x" * ((1 << 20) - 16 * 1024))
        with pytest.raises(DiskFull), atomic_open(small / "results" / "t.tsv") as handle:
            handle.write("never started")
        assert list((small / "results").iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)
