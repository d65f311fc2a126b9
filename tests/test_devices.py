"""Each GPU job of the local-gpus profile gets a device of its own (no GPU needed to test)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from emoprompt.infra.devices import claim_device, job_gpu, pinned_gpu, visible_devices


def fake_nvidia(tmp_path: Path, count: int) -> Path:
    """A stand-in for /proc/driver/nvidia/gpus with ``count`` GPUs."""
    folder = tmp_path / "gpus"
    folder.mkdir()
    for i in range(count):
        (folder / f"0000:{i:02x}:00.0").mkdir()
    return folder


def test_devices_come_from_cuda_visible_devices_or_the_driver(tmp_path: Path) -> None:
    gpus = fake_nvidia(tmp_path, 3)
    assert visible_devices({}, gpus) == ["0", "1", "2"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "2, 3"}, gpus) == ["2", "3"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}, gpus) == []
    assert visible_devices({}, tmp_path / "no-driver") == []


def test_concurrent_claims_get_different_devices_and_a_free_one_is_reused(tmp_path: Path):
    locks = tmp_path / "locks"
    first, first_lock = claim_device(["0", "1"], locks, timeout=0)
    second, second_lock = claim_device(["0", "1"], locks, timeout=0)
    assert {first, second} == {"0", "1"}
    with pytest.raises(TimeoutError, match="stayed busy"):
        claim_device(["0", "1"], locks, timeout=0.2, poll=0.05)
    first_lock.close()  # the job holding the first device ends
    again, again_lock = claim_device(["0", "1"], locks, timeout=0)
    assert again == first
    again_lock.close()
    second_lock.close()


def test_a_waiting_job_gets_the_device_another_process_releases(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from emoprompt.infra.devices import claim_device; "
         f"held = claim_device(['0'], {str(locks)!r}); print('held', flush=True); time.sleep(1.5)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        device, handle = claim_device(["0"], locks, timeout=30, poll=0.1)
        assert device == "0"
        assert time.monotonic() - start > 0.5  # it waited for the holder to exit
        handle.close()
    finally:
        holder.kill()
        holder.wait()


def test_pinned_gpu_sets_cuda_visible_devices_within_the_block(tmp_path: Path) -> None:
    gpus = fake_nvidia(tmp_path, 2)
    env: dict[str, str] = {}
    with pinned_gpu(tmp_path / "locks", env, nvidia_dir=gpus, timeout=0) as first:
        assert env["CUDA_VISIBLE_DEVICES"] == first == "0"
        other: dict[str, str] = {}
        with pinned_gpu(tmp_path / "locks", other, nvidia_dir=gpus, timeout=0) as second:
            assert other["CUDA_VISIBLE_DEVICES"] == second == "1"
    assert env == {}  # restored


def test_nothing_is_pinned_under_slurm_or_without_a_gpu(tmp_path: Path) -> None:
    env = {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "0"}
    with pinned_gpu(tmp_path / "locks", env, nvidia_dir=fake_nvidia(tmp_path, 2)) as device:
        assert device is None and env["CUDA_VISIBLE_DEVICES"] == "0"
    env = {}
    with pinned_gpu(tmp_path / "locks", env, nvidia_dir=tmp_path / "none") as device:
        assert device is None and env == {}
    assert not (tmp_path / "locks").exists()


def test_only_jobs_asking_for_it_pin_a_gpu() -> None:
    with job_gpu({"gpu": 1}) as device:
        assert device is None


def gpu_rules() -> set[str]:
    """The workflow's rules that ask for a GPU (``resources: gpu=1``), and the grid's
    copies of them (``use rule X as X_grid``)."""
    import re

    text = "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    rules = {m.group(1) for m in re.finditer(r"^rule (\w+):\n((?:    .*\n|\n)*)", text, re.M)
             if "gpu=1" in m.group(2)}  # fmt: skip
    copies = {m.group(2) for m in re.finditer(r"^use rule (\w+) as (\w+)", text, re.M)
              if m.group(1) in rules}  # fmt: skip
    return rules | copies


def test_local_gpus_profile_pins_every_gpu_rule() -> None:
    profile = yaml.safe_load((REPO / "profiles" / "local-gpus" / "config.yaml").read_text())
    assert profile["resources"]["gpu"] >= 1
    rules = gpu_rules()
    assert {"predict", "predict_family", "predict_grid", "finetune", "probe"} <= rules
    for rule in rules:
        assert profile["set-resources"][rule]["pin_gpu"] == 1, rule
