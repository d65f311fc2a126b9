"""The GPU check (scripts/gpu_check.py) in its tiny configuration on a CPU, so that it
cannot rot before a GPU runs it: the bundle it carries, both parts, its JSON and table.
(Its Llama-3.2-1B configuration runs on a GPU machine; BENCHMARKS.md says whether one
has.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from emoprompt.bench import gpu_bundle, gpu_check
from emoprompt.bench.conformance import nf4_available
from emoprompt.bench.llama3 import LLAMA_3_2_1B
from emoprompt.data.prepare import Prepared, prepare
from emoprompt.data.sampling import benchmark_sample
from emoprompt.data.splits import read_split


@pytest.fixture(scope="module")
def bundle(data_dir, llama3_tokenizer_dir, tmp_path_factory) -> Path:
    splits = tmp_path_factory.mktemp("gpu-data")
    prepare(data_dir / "emoeval_data.zip", Prepared.in_folder(splits))
    out = tmp_path_factory.mktemp("gpu-bundle") / "bundle"
    gpu_bundle.bundle(out, splits, tweets=12, shots=40, wheels=False)
    return out


def test_the_bundle_holds_the_tokenizer_and_the_benchmark_tweets(bundle, data_dir, tmp_path):
    tokenizer, tweets, train = gpu_bundle.open_bundle(bundle)
    assert len(tokenizer) == LLAMA_3_2_1B["vocab_size"] and tokenizer.chat_template
    assert (bundle / "tokenizer" / "tokenizer.json.gz").stat().st_size < 6 * 2**20  # travels
    splits = tmp_path / "splits"
    prepare(data_dir / "emoeval_data.zip", Prepared.in_folder(splits))
    drawn = benchmark_sample(read_split(splits / "test.tsv"), 12)  # make bench's draw
    assert tweets["id"].tolist() == drawn["id"].tolist()
    assert len(train) == 40 and not set(train["id"]) & set(tweets["id"])


def test_the_full_shape_is_llama_3_2_1b():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_3_2_1B)
    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e9, 2) == 1.24  # tied embeddings counted once
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        16, 2048, 8192)  # fmt: skip
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 8)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_part_past_its_limit_is_stopped_said_and_keeps_what_it_measured():
    report = {"notes": [], "conformance": [], "timing": []}

    def slow(rows):
        rows.append("first row")
        time.sleep(5)
        rows.append("never")

    gpu_check._part(report, "conformance", "nf4", 0.3, lambda: slow(report["conformance"]))
    assert report["conformance"] == ["first row"]
    assert report["notes"] == ["nf4 conformance: stopped after its limit of 0 s"]

    def recorded():  # a handler that records errors (as the matrix's methods do)
        try:
            time.sleep(5)
        except Exception as exc:  # what the limit must get through
            report["timing"].append(repr(exc))

    gpu_check._part(report, "timing", "nf4", 0.3, recorded)
    assert report["timing"] == [] and report["notes"][-1].startswith("nf4 timing: stopped")


@pytest.mark.slow
def test_the_tiny_check_runs_on_a_cpu_and_writes_its_table(bundle, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "run",
               "--bundle", str(bundle), "--out", str(out), "--device", "cpu", "--shape", "tiny",
               "--prompts", str(REPO / "prompts"), "--tweets", "8", "--notebook-tweets", "2",
               "--batches", "16", "32"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["versions"]["torch"] and "cuda" in report["versions"]
    weights = {"bfloat16", "nf4"} if nf4_available() else {"bfloat16"}
    assert {r["weights"] for r in report["conformance"]} == weights
    # every method, the granted speed-ups and each forced one, passes on the same model
    assert all(r["passed"] for r in report["conformance"]), report["conformance"]
    granted = [r for r in report["conformance"] if r["added"] is None]
    assert {r["method"] for r in granted} == {"first_token", "likelihood", "greedy",
            "likelihood_normalized", "likelihood_calibrated"}  # fmt: skip
    # the timed runs use what part 1 proved (on a CPU: the table's speed-ups)
    fast = [r for r in report["timing"] if r["case"] == "few_shot_first_token"]
    assert fast and all("prefix_reuse" in r["speedups"] for r in fast)
    assert any(r["case"] == "few_shot_first_token, no prefix reuse" for r in report["timing"])
    cases = {(r["weights"], r["case"]) for r in report["timing"]}
    for kind in weights:
        assert (kind, "notebook's way (zero-shot generation)") in cases
        assert all((kind, name) in cases for name in gpu_check.STRATEGY_NAMES)
        assert (kind, "zero_shot_first_token, batch 32") in cases
    assert all(r["tweets_per_s"] > 0 and r["peak_mib"] > 0 for r in report["timing"])
    table = (out / "gpu_check.md").read_text()
    assert "## Conformance" in table and "| bfloat16 | zero_shot_first_token | 16 |" in table
    assert "notebook's way" in table and not report["notes"]


def test_a_machine_without_what_the_check_imports_is_told_before_anything_loads(
    bundle, tmp_path, monkeypatch
):
    monkeypatch.setattr(gpu_check, "NEEDS", ("pandas", "no_such_module_here"))
    with pytest.raises(SystemExit, match="needs no_such_module_here"):
        gpu_check.run(bundle, tmp_path / "out", device="cpu", shape="tiny")
    assert not (tmp_path / "out").exists()
