"""Acceptance of the conformance work through the workflow: catalogue entries pointing at
a local folder with an architecture of sliding-window and global layers (Gemma 3), and at
a tiny Llama loaded in 4-bit NF4 on the CPU, and the embedded SmolLM2 in NF4 (the course
notebook's loading), run every prompting strategy and give the plain reference backend's
predictions on the same model, with the files and MLflow runs of any other model. (The
other architectures are checked by the conformance matrix, tests/test_conformance.py.)"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, copy_workflow, run_snakemake

from emoprompt.bench.conformance import (
    ARCHITECTURES,
    BFLOAT16_ATOL,
    NF4_WIDTHS,
    nf4_available,
    tiny_model,
)
from emoprompt.data.splits import read_split
from emoprompt.evaluation.job import settings_from_config
from emoprompt.evaluation.predictions import read_predictions, score_columns
from emoprompt.evaluation.runner import run_llm_strategy
from emoprompt.evaluation.strategies import STRATEGIES
from emoprompt.inference.reference import ReferenceBackend
from emoprompt.prompting.prompt_file import load_prompt_file

pytestmark = pytest.mark.slow

NF4 = {"dtype": "bfloat16", "quantization": "nf4"}
# name -> (architecture, widths, how the entry loads it); the NF4 ones where bitsandbytes runs
MODELS = {"tiny-gemma3": ("gemma3, local and global layers", None, {"dtype": "float32"})}
if nf4_available():
    MODELS["tiny-llama-nf4"] = ("llama", NF4_WIDTHS, NF4)
EMBEDDED_NF4: list[str] = []  # the embedded model in NF4: its own test below
# Every strategy a chat model without an adapter runs.
PROMPTING = [name for name, s in STRATEGIES.items() if s.family in ("zero_shot", "few_shot")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir: Path, smollm2_dir: Path):
    from transformers import AutoTokenizer

    from emoprompt.models.loading import prepare_tokenizer

    workflow = copy_workflow(tmp_path_factory.mktemp("archs") / "wf")
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(smollm2_dir))
    catalogue = {}
    for name, (arch_name, widths, loading) in MODELS.items():
        arch = next(a for a in ARCHITECTURES if a.name == arch_name)
        folder = workflow / "models" / name
        tiny_model(arch, tokenizer, "float32", widths=widths).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        catalogue[name] = {
            "source": "local",
            "path": f"models/{name}",
            "prompt_format": "chat",
            **loading,
        }
    config = {
        "models": [*MODELS, *EMBEDDED_NF4],
        "strategies": [*PROMPTING, "baseline_tfidf"],
        "model_catalogue": catalogue,
        "sample_size": 8,
        "sample_scheme": "stratified",
    }
    (workflow / "archs.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    run_snakemake(
        workflow,
        "--resources",
        "gpu=1",
        "--configfile",
        "archs.yaml",
        "--config",
        f"data_source={data_dir / 'emoeval_data.zip'}",
    )
    return workflow, tokenizer


def assert_same_predictions(got, reference, strategy: str, quantized: bool) -> None:
    """float32: the same labels, texts and probabilities (1e-4). NF4 computes in
    bfloat16, whose rounding differs between a batch and a single prompt: the matrix's
    pass mark (tests/test_conformance.py) - probabilities within BFLOAT16_ATOL and the same
    label wherever the reference's top two are more than 2 x BFLOAT16_ATOL apart; a
    generated text may part from the reference's at a near tie, as the matrix reports."""
    if STRATEGIES[strategy].method == "generate":
        if not quantized:
            assert got["predicted"].tolist() == reference["predicted"].tolist(), strategy
            assert got["raw"].fillna("").tolist() == reference["raw"].tolist(), strategy
        return
    columns = score_columns()
    want, have = reference[columns].to_numpy(), got[columns].to_numpy()
    assert np.abs(have - want).max() <= (BFLOAT16_ATOL if quantized else 1e-4), strategy
    ordered = np.sort(want, axis=1)
    decisive = ordered[:, -1] - ordered[:, -2] > 2 * BFLOAT16_ATOL if quantized else True
    same = got["predicted"].to_numpy() == reference["predicted"].to_numpy()
    assert (same | ~np.asarray(decisive)).all(), (strategy, got["predicted"].tolist())


def _reference_model(workflow: Path, name: str):
    """The model the reference backend runs: loaded as the entry loads it."""
    from emoprompt.models.loading import load_model

    config = yaml.safe_load((workflow / "archs.yaml").read_text())
    entry = config.get("model_catalogue", {}).get(name) or {**NF4}
    folder = workflow / "models" / name
    if not folder.is_dir():  # the embedded model, converted by the workflow
        folder = workflow / "data" / "models" / name
    return load_model(entry, str(folder), device="cpu")


@pytest.mark.parametrize("name", [*MODELS, *EMBEDDED_NF4])
def test_every_strategy_gives_the_reference_predictions(finished, name):
    workflow, _ = finished
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    settings = settings_from_config(config)
    train = read_split(workflow / "data" / "processed" / "train.tsv")
    sample = read_split(workflow / "data" / "processed" / "test_sample.tsv")
    loaded = _reference_model(workflow, name)
    model, tokenizer = loaded.model, loaded.tokenizer
    quantized = loaded.info["quantization"] == "nf4"
    for strategy in PROMPTING:
        family = STRATEGIES[strategy].family
        prompt = load_prompt_file(REPO / "prompts" / f"{family}.yaml", family)
        reference = run_llm_strategy(
            STRATEGIES[strategy],
            ReferenceBackend(model, tokenizer),
            tokenizer,
            prompt,
            train,
            sample,
            settings,
        ).predictions
        base = workflow / "results" / "predictions" / name / strategy
        got = read_predictions(f"{base}.tsv")
        assert got["id"].tolist() == reference["id"].tolist()
        assert_same_predictions(got, reference, strategy, quantized)
        record = json.loads(Path(f"{base}.json").read_text())
        backend = record["backend"]
        assert backend["backend"] == "engine"
        if quantized:
            assert record["quantization"] == "nf4"
            assert backend["model_key"] == "llama/sdpa/cpu/bfloat16/4bit"
        else:
            assert "+sliding" in backend["model_key"]
            assert "prefix_reuse" not in backend["speedups"]


def test_the_runs_look_like_any_other_model(finished):
    workflow, _ = finished
    table = pd.read_csv(workflow / "results" / "results_table.csv")
    for name in [*MODELS, *EMBEDDED_NF4]:
        assert set(PROMPTING) <= set(table.loc[table["model"] == name, "experiment"])
    with sqlite3.connect(workflow / "results" / "mlflow.db") as db:
        params = db.execute(
            "SELECT p.value FROM params p JOIN runs r ON r.run_uuid = p.run_uuid "
            "WHERE p.key = 'model_key' AND r.lifecycle_stage = 'active'"
        ).fetchall()
    assert len(params) == (len(MODELS) + len(EMBEDDED_NF4)) * len(PROMPTING)
    expected = {"gemma3_text+sliding/sdpa/cpu/float32"}
    if nf4_available():
        expected.add("llama/sdpa/cpu/bfloat16/4bit")
    assert {value for (value,) in params} == expected


@pytest.mark.skipif(not nf4_available(), reason="bitsandbytes cannot run NF4 here")
def test_the_embedded_model_in_nf4_gives_the_nf4_reference_predictions(
    tmp_path, data_dir: Path
):
    """smollm2-135m-instruct-nf4 (the course notebook's loading) through the workflow on
    6 tweets, against the reference backend on the same NF4 model."""
    workflow = copy_workflow(tmp_path / "wf")
    strategies = ["zero_shot_first_token", "few_shot_first_token", "zero_shot_label_likelihood"]
    config = {"models": ["smollm2-135m-instruct-nf4"], "strategies": strategies,
              "sample_size": 6, "sample_scheme": "stratified"}  # fmt: skip
    (workflow / "archs.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    run_snakemake(workflow, "--resources", "gpu=1", "--configfile", "archs.yaml", "--config",
                  f"data_source={data_dir / 'emoeval_data.zip'}")  # fmt: skip
    loaded = _reference_model(workflow, "smollm2-135m-instruct-nf4")
    assert loaded.info["quantization"] == "nf4"
    settings = settings_from_config(yaml.safe_load((REPO / "config.yaml").read_text()))
    train = read_split(workflow / "data" / "processed" / "train.tsv")
    sample = read_split(workflow / "data" / "processed" / "test_sample.tsv")
    for strategy in strategies:
        family = STRATEGIES[strategy].family
        prompt = load_prompt_file(REPO / "prompts" / f"{family}.yaml", family)
        reference = run_llm_strategy(
            STRATEGIES[strategy], ReferenceBackend(loaded.model, loaded.tokenizer),
            loaded.tokenizer, prompt, train, sample, settings,
        ).predictions  # fmt: skip
        base = workflow / "results" / "predictions" / "smollm2-135m-instruct-nf4" / strategy
        assert_same_predictions(read_predictions(f"{base}.tsv"), reference, strategy, True)
        record = json.loads(Path(f"{base}.json").read_text())
        assert record["quantization"] == "nf4"
        assert record["backend"]["model_key"] == "llama/sdpa/cpu/bfloat16/4bit"
