"""The conformance matrix: every speed-up the capability table grants, on every
architecture and dtype it is granted for, equals the plain reference backend.

The matrix runs once per device (CUDA where present); the tests then check its rows,
that the table and the matrix cover each other, that the matrix does catch a wrong
speed-up (prefix reuse beyond a sliding window, the label tree under one), and that
docs/conformance.md is the one
the current table writes.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
import torch
from conftest import REPO

from emoprompt.bench import conformance
from emoprompt.bench.conformance import ARCHITECTURES, DTYPES, PATHS, run_matrix
from emoprompt.inference import capabilities
from emoprompt.inference.capabilities import PROVEN, SPEEDUPS, ModelKey
from emoprompt.inference.engine import Engine

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
    ),
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Any:
    from transformers import AutoTokenizer

    from emoprompt.models.loading import prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(smollm2_dir))


@pytest.fixture(scope="module", params=DEVICES)
def matrix(request, tokenizer) -> list[dict[str, Any]]:
    return run_matrix(tokenizer, REPO / "prompts", device=request.param)


@pytest.mark.slow
def test_every_row_of_the_matrix_meets_its_pass_mark(matrix):
    failed = [row for row in matrix if not row["passed"]]
    assert not failed, failed
    per_model = len(PATHS) * len(conformance.METHODS)
    expected = len(ARCHITECTURES) * len(DTYPES) * per_model
    if conformance.NF4 in conformance.matrix_dtypes(matrix[0]["device"]):
        expected += len(conformance.NF4_ARCHITECTURES) * per_model
        assert {r["model_key"] for r in matrix if r["dtype"] == "nf4"} == {
            "llama/sdpa/cpu/bfloat16/4bit"
        }
    assert len(matrix) == expected
    for row in matrix:
        if row["dtype"] == "float32" and row["method"] != "greedy":
            assert row["max_prob_diff"] <= 1e-4, row
        if row["dtype"] == "float32" and row["method"] == "greedy":
            assert row["same_text"] == row["prompts"] == 16, row


@pytest.mark.slow
def test_the_table_grants_exactly_what_the_matrix_checked(matrix):
    keys = {row["model_key"] for row in matrix}
    if matrix[0]["device"] == "cpu":
        # every key of the table is one the matrix ran
        assert {str(key) for key in PROVEN} == keys
    proven = {str(key): speedups for key, speedups in PROVEN.items()}
    for row in matrix:
        granted = proven.get(row["model_key"], frozenset())  # none: the safe path
        assert set(row["speedups"]) <= granted
        if row["prefix_reuse_asked"]:
            assert ("prefix_reuse" in row["speedups"]) == ("prefix_reuse" in granted)
    # sliding windows never get the shared-prefix attention or the label tree; prefix
    # reuse they get for the rows that fit the window (test_planning.py)
    for row in matrix:
        if "sliding" in row["model_key"]:
            assert not {"shared_attention", "tree_labels"} & set(row["speedups"])
    # the unmerged LoRA model gets the same speed-ups as the plain one
    lora = [r for r in matrix if r["architecture"] == "llama + unmerged LoRA"]
    plain = {
        (r["dtype"], r["batch"], r["prefix_reuse_asked"]): r["speedups"]
        for r in matrix
        if r["architecture"] == "llama"
    }
    assert lora and all(
        r["speedups"] == plain[r["dtype"], r["batch"], r["prefix_reuse_asked"]] for r in lora
    )


def test_the_matrix_catches_what_the_table_leaves_out_under_a_sliding_window(tokenizer):
    """Forcing the label tree on a sliding-window model fails the matrix."""
    qwen = next(a for a in ARCHITECTURES if a.name == "qwen2, sliding window")
    rows = run_matrix(
        tokenizer, REPO / "prompts", architectures=[qwen], dtypes=["float32"], additions=True
    )
    added = {row["added"] for row in rows}
    assert "tree_labels" in added and "prefix_reuse" not in added  # granted
    # the label tree's 4D mask does not fit the windowed layers: label likelihoods fail
    tree = [r for r in rows if r["added"] == "tree_labels"]
    assert any("error" in r for r in tree if r["method"].startswith("likelihood"))


def test_prefix_reuse_under_a_window_fails_without_the_window_condition(tokenizer, monkeypatch):
    """On the Gemma 3 model whose window falls between the prompts' lengths, the rows
    that reuse a prefix (those that fit) pass; with the condition dropped (the window
    taken for full attention), every prompt reuses its prefix and the padded batches
    fail, on every method."""
    gemma = next(a for a in ARCHITECTURES if a.name == "gemma3, window across the prompts")

    def reuse_rows():
        rows = run_matrix(tokenizer, REPO / "prompts", architectures=[gemma], dtypes=["float32"])
        return [r for r in rows if r["prefix_reuse_asked"] and r["batch"] > 1]

    fed = []
    plan = conformance.Engine.__init__

    def spy(self, *args, **kwargs):
        plan(self, *args, **kwargs)
        if self.reuse_prefix:
            fed.append(self.stats)

    monkeypatch.setattr(conformance.Engine, "__init__", spy)
    with_condition = reuse_rows()
    assert all(r["passed"] for r in with_condition)
    assert "prefix_reuse" in with_condition[0]["speedups"]
    # some prompts were fed whole, the others (every prompt has a prefix) reused theirs
    assert all(0 < stats["outside_window"] < stats["prompts"] for stats in fed)
    monkeypatch.setattr(capabilities, "attention_window", lambda model: None)
    without = reuse_rows()
    assert {r["method"] for r in without if not r["passed"]} == set(conformance.METHODS)
    assert max(r["max_prob_diff"] for r in without if "max_prob_diff" in r) > 1e-2


@pytest.mark.slow
def test_docs_table_is_the_one_the_current_table_writes(matrix):
    """docs/conformance.md is written by `make conformance`: its rows (architecture,
    dtype, path, speed-ups) are those of the current table; differences are measured
    again, as they depend on the CPU."""
    if matrix[0]["device"] != "cpu":
        pytest.skip("the document is written on a CPU")
    doc = (REPO / "docs" / "conformance.md").read_text(encoding="utf-8")
    section = doc.split("## With the speed-ups the capability table grants", 1)[1]
    section = section.split("\n## ", 1)[0]

    def cells(lines):
        return [tuple(c.strip() for c in line.split("|")[1:5]) for line in lines]

    lines = section.splitlines()
    documented = cells(line for line in lines if re.match(r"\| [a-z]", line))[1:]  # no header
    current = cells(conformance.markdown_table(matrix)[2:])
    assert documented == current, "run `make conformance` to rewrite docs/conformance.md"


def test_a_model_outside_the_table_runs_the_safe_path(tiny_llama, monkeypatch, caplog):
    model, tokenizer = tiny_llama
    monkeypatch.setattr(capabilities, "PROVEN", {})
    with caplog.at_level(logging.WARNING, logger="emoprompt.inference.capabilities"):
        engine = Engine(model, tokenizer, progress=False)
    assert engine.capabilities.speedups == frozenset()
    assert not engine.reuse_prefix
    assert "has not proven llama/sdpa/cpu/float32" in caplog.text
    record = engine.describe()
    assert record["speedups"] == [] and "safe path" in record["notes"][0]


def test_library_versions_outside_the_proven_ones_run_the_safe_path(tiny_llama, monkeypatch):
    model, tokenizer = tiny_llama
    monkeypatch.setattr(capabilities, "PROVEN_VERSIONS", {"torch": "2.99", "transformers": "5.24"})
    engine = Engine(model, tokenizer, progress=False)
    assert engine.capabilities.speedups == frozenset()
    assert "torch" in engine.describe()["notes"][0] and "2.99" in engine.describe()["notes"][0]


def test_speedups_can_be_turned_off_by_name_and_unknown_names_are_refused(tiny_llama):
    model, tokenizer = tiny_llama
    engine = Engine(model, tokenizer, disable=["packed_weights", "tree_labels"], progress=False)
    used = engine.capabilities.speedups
    assert "packed_weights" not in used and "tree_labels" not in used and "prefix_reuse" in used
    assert Engine(model, tokenizer, speedups="none", progress=False).describe()["speedups"] == []
    with pytest.raises(ValueError, match="unknown speed-up"):
        Engine(model, tokenizer, disable=["warp_drive"], progress=False)


def test_model_key_names_what_decides_the_computation(tiny_llama):
    model, _ = tiny_llama
    key = capabilities.model_key(model)
    assert key == ModelKey("llama", "sdpa", "cpu", "float32")
    assert str(key) == "llama/sdpa/cpu/float32"
    assert set(SPEEDUPS) >= set().union(*PROVEN.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 4-bit needs CUDA")
def test_a_4bit_model_with_an_unmerged_adapter_keeps_the_last_position_path(tokenizer, tmp_path):
    """4-bit weights (bitsandbytes NF4) under an unmerged LoRA adapter: logits_to_keep is
    found through the peft wrapper (the logits of the last position only)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    arch = ARCHITECTURES[0]
    model = conformance.tiny_model(arch, tokenizer, "bfloat16", "cuda")
    folder = tmp_path / "nf4-tiny"
    model.save_pretrained(folder)
    from transformers import AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        device_map="cuda",
    )
    wrapped = get_peft_model(quantized, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    engine = Engine(wrapped, tokenizer, progress=False)
    assert engine.capabilities.keeps_logits
    assert engine.capabilities.key.quantization == "4bit"
    assert engine.capabilities.key.adapter == "lora"


def test_pyproject_holds_torch_and_transformers_to_the_proven_releases():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, minor in capabilities.PROVEN_VERSIONS.items():
        (spec,) = [d for d in deps if re.match(rf"{name}\b", d)]
        major, low = minor.split(".")
        assert spec == f"{name}>={minor},<{major}.{int(low) + 1}", spec
