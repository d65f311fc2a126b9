"""The workflow on a real SLURM cluster through profiles/slurm, and the same results locally.

The test installs Debian's SLURM 22.05, munge and MariaDB where they are missing, starts a
one-node cluster on 127.0.0.1 (tests/slurm_cluster.py: slurmctld, slurmd, and slurmdbd
with MariaDB, so that ``sacct`` answers from the accounting database), runs the workflow
on a small sample with the embedded SmolLM2 through the SLURM profile, checks with
``sacct`` that every job ran, and completed, as a SLURM job, and stops every daemon it
started (also when something fails). It is skipped, with the reason, where SLURM cannot
be installed or run (not root, no apt-get or no Debian mirror, a machine with a SLURM
configuration of its own), or when EMOPROMPT_SKIP_SLURM=1.

There is no GPU here, and none is faked: the cluster's node declares no GPU. The profile
the test uses is profiles/slurm/config.yaml with its GPU requests removed: the rules that
ask SLURM for a GPU there (``gpu: 1`` on a GPU partition) run on the CPU partition
without one. Everything else is the profile's (its CPU partition's name, threads, time
limits), with the status checks made more frequent and memory requests capped to the
node. Then the same workflow runs locally (``--cores 2``) with the same seeds, and its
predictions and scores must equal the SLURM run's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import BIN, REPO, copy_workflow, run_snakemake
from slurm_cluster import ClusterUnavailable, SlurmCluster, install_slurm

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
STRATEGIES = ("zero_shot_first_token", "baseline_tfidf")
PAIRS = [(MODEL, "zero_shot_first_token"), ("baseline", "baseline_tfidf")]
GPU_KEYS = ("gpu", "gres", "gpu_model")
THREADS = 1  # of the predict job, on SLURM and locally alike (same sums, same floats)
TIMING = ("seconds", "tweets_per_s")


def run_config(data_dir: Path) -> list[str]:
    return [
        f"data_source={data_dir / 'emoeval_data.zip'}",
        "sample_size=4",
        "sample_seed=3",
        f"strategies=[{','.join(STRATEGIES)}]",
        "prompt_variants={'strategies': []}",  # each strategy's own prompt
    ]


def gpu_less_profile(cluster: SlurmCluster, folder: Path) -> Path:
    """profiles/slurm without its GPU requests (no GPU here), for this small cluster."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    partition = profile["default-resources"]["slurm_partition"]
    assert cluster.partition == partition
    gpu_rules = [r for r, res in profile["set-resources"].items() if res.get("gpu")]
    assert {"predict", "predict_family", "predict_grid", "finetune"} <= set(gpu_rules)
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        if any(key in resources for key in GPU_KEYS):
            for key in GPU_KEYS:
                resources.pop(key, None)
            resources["gpu"] = 0  # overrides the rule's own gpu=1 (no sbatch --gpus)
        if "slurm_partition" in resources:
            resources["slurm_partition"] = partition
        if "mem_mb" in resources:
            resources["mem_mb"] = min(resources["mem_mb"], cluster.memory_mb // 2)
    profile["set-threads"] = {rule: THREADS for rule in profile["set-threads"]}
    profile.update({
        "jobs": 2,
        "retries": 0,
        "keep-going": False,
        "seconds-between-status-checks": 2,
        "slurm-init-seconds-before-status-checks": 2,
        "slurm-keep-successful-logs": True,
    })
    (folder / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.environ.get("EMOPROMPT_SKIP_SLURM") == "1":
        pytest.skip("EMOPROMPT_SKIP_SLURM=1")
    try:
        install_slurm()
    except ClusterUnavailable as reason:
        pytest.skip(f"SLURM cannot be installed here: {reason}")
    started = time.monotonic()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as reason:
        pytest.skip(f"SLURM cannot run here: {reason}")
    print(f"cluster up in {time.monotonic() - started:.0f} s at {cluster.root}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm_run(cluster: SlurmCluster, data_dir: Path, tmp_path_factory) -> dict:
    """The workflow's default target on the cluster, through the (GPU-less) SLURM profile."""
    root = tmp_path_factory.mktemp("slurm-run")
    workflow = copy_workflow(root / "wf")
    profile = gpu_less_profile(cluster, root / "profile")
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "snakemake"), "--profile", str(profile), "--config", *run_config(data_dir)],
        cwd=workflow, env=cluster.env, capture_output=True, text=True, timeout=1500,
    )
    seconds = time.monotonic() - started
    log = result.stdout + result.stderr
    if result.returncode != 0:
        slurm_logs = "\n".join(
            f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted((workflow / ".snakemake" / "slurm_logs").rglob("*.log"))
        )
        raise AssertionError(f"snakemake on SLURM failed:\n{log}\n{slurm_logs}")
    print(f"workflow on SLURM: {seconds:.0f} s")
    return {"workflow": workflow, "log": log}


def test_every_job_ran_as_a_slurm_job(cluster: SlurmCluster, slurm_run: dict) -> None:
    log = slurm_run["log"]
    submitted = log.count("has been submitted with SLURM jobid")
    rules = {line.split("(Rule: ")[1].rstrip(")") for line in log.splitlines()
             if "Finished jobid" in line and "(Rule: " in line}
    expected = {"download", "prepare", "sample", "convert_model", "predict", "baseline",
                "inspect_model", "metrics", "results_table", "track"}
    assert expected <= rules
    # sacct reads slurmdbd's database: one COMPLETED job per workflow job ("all" is local).
    rows = [line.split("|") for line in cluster.run(
        "sacct", "-X", "-n", "-P", "-a", "--starttime", "now-1days",
        "-o", "JobID,State,ExitCode,Partition,Comment%200").splitlines()]
    assert len(rows) == submitted >= len(expected)
    assert {(state, code) for _, state, code, _, _ in rows} == {("COMPLETED", "0:0")}
    assert {partition for *_, partition, _ in rows} == {cluster.partition}
    by_rule = {comment.split("_wildcards_")[0].removeprefix("rule_") for *_, comment in rows}
    assert by_rule == rules - {"all"}  # every rule's jobs ran on the cluster
    results = slurm_run["workflow"] / "results"
    for model, strategy in PAIRS:
        assert (results / f"predictions/{model}/{strategy}.tsv").is_file()
    assert (results / "results_table.md").is_file() and (results / "mlflow_runs.tsv").is_file()


def without(mapping: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in mapping.items() if k not in keys}


def test_slurm_and_local_runs_give_identical_results(
    slurm_run: dict, data_dir: Path, tmp_path: Path
) -> None:
    on_slurm = slurm_run["workflow"]
    local = copy_workflow(tmp_path / "local")
    # The converted model is reused (its conversion is deterministic and slow); everything
    # from the data to the scores is made again, on this machine, by the local executor.
    shutil.copytree(on_slurm / "data" / "models", local / "data" / "models")
    targets = [f"results/predictions/{m}/{s}.tsv" for m, s in PAIRS]
    targets += [f"results/metrics/{m}/{s}.json" for m, s in PAIRS]
    targets += ["results/results_table.csv"]
    run_snakemake(local, "--rerun-triggers", "mtime", "--set-threads", f"predict={THREADS}",
                  "--config", *run_config(data_dir), "--", *targets)
    assert not (local / ".snakemake" / "slurm_logs").exists()

    for name in ("data/processed/test_sample.tsv", *targets[: len(PAIRS)]):
        assert (local / name).read_bytes() == (on_slurm / name).read_bytes(), name
    for name in targets[len(PAIRS) : 2 * len(PAIRS)]:
        slurm_metrics, local_metrics = (json.loads((d / name).read_text())
                                        for d in (on_slurm, local))
        assert without(local_metrics, TIMING) == without(slurm_metrics, TIMING), name
    for model, strategy in PAIRS:
        name = f"results/predictions/{model}/{strategy}.json"
        slurm_meta, local_meta = (json.loads((d / name).read_text()) for d in (on_slurm, local))
        assert local_meta.get("threads") == slurm_meta.get("threads")
        assert local_meta.get("prompt_sha256") == slurm_meta.get("prompt_sha256")
    slurm_table, local_table = (pd.read_csv(d / "results/results_table.csv")
                                for d in (on_slurm, local))
    pd.testing.assert_frame_equal(local_table.drop(columns="tweets/s"),
                                  slurm_table.drop(columns="tweets/s"))
