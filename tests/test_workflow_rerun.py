"""Editing one prompt file re-runs only the jobs that use it and what depends on them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import run_snakemake


def mark_everything_built(workflow: Path, config: list[str]) -> None:
    """Build the data for real, stand in empty files for the rest, mark all up to date."""
    run_snakemake(workflow, "data/processed/test_sample.tsv", "--config", *config)
    summary = run_snakemake(workflow, "--summary", "--config", *config).stdout
    for line in summary.splitlines()[1:]:
        name, *_, status, _plan = line.split("\t")
        path = workflow / name
        if status == "missing":
            if name.startswith("data/models/"):
                path.mkdir(parents=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    run_snakemake(workflow, "--touch", "--config", *config)
    assert "Nothing to be done" in run_snakemake(workflow, "-n", "--config", *config).stdout


def planned_jobs(workflow: Path, config: list[str]) -> set[str]:
    """(rule, wildcards) of each job a dry run would run."""
    out = run_snakemake(workflow, "-n", "--config", *config).stdout
    jobs = set()
    for block in re.split(r"\n(?=(?:local)?rule )", out):
        match = re.match(r"(?:local)?rule (\w+):", block)
        if match:
            wildcards = re.search(r"wildcards: (.*)", block)
            jobs.add(f"{match.group(1)} {wildcards.group(1) if wildcards else ''}".strip())
    return jobs


@pytest.mark.slow
def test_editing_the_few_shot_prompt_reruns_only_few_shot_jobs(workflow_dir: Path, data_dir: Path):
    config = [f"data_source={data_dir}"]
    mark_everything_built(workflow_dir, config)
    prompt = workflow_dir / "prompts" / "few_shot.yaml"
    prompt.write_text(prompt.read_text().replace("shots: 10", "shots: 5"))

    jobs = planned_jobs(workflow_dir, config)
    model = "model=smollm2-135m-instruct"
    few_shot = {"few_shot_generate", "few_shot_first_token", "few_shot_label_likelihood"}
    family = "few_shot_first_token"  # a prompt family: all its variants run again
    expected = {f"predict {model}, strategy={s}" for s in few_shot - {family}}
    expected |= {f"{rule} {model}, strategy={family}"
                 for rule in ("predict_family", "choose_variant", "chosen_variant")}
    expected |= {f"metrics {model}, strategy={s}" for s in few_shot}
    expected |= {"results_table", "compare", "track", "all", "prompt_sensitivity"}
    assert jobs == expected
