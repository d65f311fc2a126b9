"""The data rules run by Snakemake on the local copy of EmoEvalEs, and config validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_snakemake

from emoprompt.data.splits import read_split

DATA_OUTPUTS = ["data/processed/test_sample.tsv", "results/data/class_distribution.tsv"]
PROCESSED = [
    "data/processed/train.tsv",
    "data/processed/validation.tsv",
    "data/processed/test.tsv",
    "data/processed/split_ids.json",
    "data/processed/test_sample.tsv",
]


@pytest.mark.slow
def test_zip_and_folder_sources_give_identical_files(workflow_dir: Path, data_dir: Path):
    run_snakemake(
        workflow_dir, *DATA_OUTPUTS, "--config", f"data_source={data_dir / 'emoeval_data.zip'}"
    )
    from_zip = {name: (workflow_dir / name).read_bytes() for name in PROCESSED}
    assert len(read_split(workflow_dir / "data/processed/train.tsv")) == 5723 - 572
    assert len(read_split(workflow_dir / "data/processed/validation.tsv")) == 572
    assert len(read_split(workflow_dir / "data/processed/test.tsv")) == 844
    assert len(read_split(workflow_dir / "data/processed/test_sample.tsv")) == 100
    assert "sha256 of" in (workflow_dir / "logs/download.log").read_text()
    assert "Otras" in (workflow_dir / "logs/sample.log").read_text()

    run_snakemake(workflow_dir, *DATA_OUTPUTS, "--config", f"data_source={data_dir}")
    assert (workflow_dir / "data/raw/emoeval_data").is_dir()
    for name in PROCESSED:
        assert (workflow_dir / name).read_bytes() == from_zip[name], name


def test_wrong_key_or_value_fails_at_once_naming_it(workflow_dir: Path):
    result = run_snakemake(workflow_dir, "-n", "--config", "sample_sise=10", check=False)
    assert result.returncode != 0
    assert "sample_sise" in result.stdout + result.stderr
    result = run_snakemake(workflow_dir, "-n", "--config", "sample_scheme=clustered", check=False)
    assert result.returncode != 0
    assert "clustered" in result.stdout + result.stderr


def test_bad_checksum_stops_the_download_and_leaves_no_output(workflow_dir: Path, data_dir: Path):
    result = run_snakemake(
        workflow_dir,
        "data/raw/provenance.json",
        "--config",
        f"data_source={data_dir / 'emoeval_data.zip'}",
        f"data_sha256={'f' * 64}",
        check=False,
    )
    assert result.returncode != 0
    assert "checksum mismatch" in (workflow_dir / "logs/download.log").read_text()
    assert not (workflow_dir / "data/raw/emoeval_data.zip").exists()


@pytest.mark.slow
def test_an_offline_rerun_with_another_source_keeps_the_data_in_place(
    workflow_dir: Path, data_dir: Path
):
    local = f"data_source={data_dir / 'emoeval_data.zip'}"
    run_snakemake(workflow_dir, "data/raw/provenance.json", "--config", local)
    raw = workflow_dir / "data/raw/emoeval_data.zip"
    before = raw.read_bytes()
    offline = "data_source=http://127.0.0.1:9/emoeval_data.zip"  # nothing listens there
    result = run_snakemake(workflow_dir, "data/raw/provenance.json", "--config", offline,
                           "download_retries=0", check=False)  # fmt: skip
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "data_source changed from" in output and "is kept in data/raw/emoeval_data.zip" in output
    assert "make run DATA=" in output and "Traceback" not in output
    assert raw.read_bytes() == before  # the user's data is still there
    run_snakemake(workflow_dir, "data/processed/test.tsv", "--config", local)  # and serves
