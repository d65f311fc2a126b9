"""Acceptance of the conformance work through the workflow: a catalogue entry pointing at
a local folder with an architecture of sliding-window and global layers (Gemma 3) runs
every prompting strategy and gives the plain reference backend's predictions, with the
files and MLflow runs of any other model. (The other architectures are checked by the
conformance matrix, tests/test_conformance.py.)"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, copy_workflow, run_snakemake

from emoprompt.bench.conformance import ARCHITECTURES, tiny_model
from emoprompt.data.splits import read_split
from emoprompt.evaluation.job import settings_from_config
from emoprompt.evaluation.predictions import read_predictions, score_columns
from emoprompt.evaluation.runner import run_llm_strategy
from emoprompt.evaluation.strategies import STRATEGIES
from emoprompt.inference.reference import ReferenceBackend
from emoprompt.prompting.prompt_file import load_prompt_file

pytestmark = pytest.mark.slow

MODELS = {"tiny-gemma3": "gemma3, local and global layers"}
# Every strategy a chat model without an adapter runs.
PROMPTING = [name for name, s in STRATEGIES.items() if s.family in ("zero_shot", "few_shot")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir: Path, smollm2_dir: Path):
    from transformers import AutoTokenizer

    from emoprompt.models.loading import prepare_tokenizer

    workflow = copy_workflow(tmp_path_factory.mktemp("archs") / "wf")
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(smollm2_dir))
    catalogue = {}
    for name, arch_name in MODELS.items():
        arch = next(a for a in ARCHITECTURES if a.name == arch_name)
        folder = workflow / "models" / name
        tiny_model(arch, tokenizer, "float32").save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        catalogue[name] = {
            "source": "local",
            "path": f"models/{name}",
            "prompt_format": "chat",
            "dtype": "float32",
        }
    config = {
        "models": list(MODELS),
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


def test_every_strategy_gives_the_reference_predictions(finished):
    from transformers import AutoModelForCausalLM

    workflow, tokenizer = finished
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    settings = settings_from_config(config)
    train = read_split(workflow / "data" / "processed" / "train.tsv")
    sample = read_split(workflow / "data" / "processed" / "test_sample.tsv")
    for name in MODELS:
        model = AutoModelForCausalLM.from_pretrained(workflow / "models" / name)
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
            assert got["predicted"].tolist() == reference["predicted"].tolist(), (name, strategy)
            if STRATEGIES[strategy].method == "generate":
                assert got["raw"].fillna("").tolist() == reference["raw"].tolist()
            else:
                columns = score_columns()
                diff = np.abs(got[columns].to_numpy() - reference[columns].to_numpy())
                assert diff.max() <= 1e-4, (name, strategy, diff.max())
            record = json.loads(Path(f"{base}.json").read_text())["backend"]
            assert record["backend"] == "engine" and "+sliding" in record["model_key"]
            assert "prefix_reuse" not in record["speedups"]


def test_the_runs_look_like_any_other_model(finished):
    workflow, _ = finished
    table = pd.read_csv(workflow / "results" / "results_table.csv")
    for name in MODELS:
        assert set(PROMPTING) <= set(table.loc[table["model"] == name, "experiment"])
    with sqlite3.connect(workflow / "results" / "mlflow.db") as db:
        params = db.execute(
            "SELECT p.value FROM params p JOIN runs r ON r.run_uuid = p.run_uuid "
            "WHERE p.key = 'model_key' AND r.lifecycle_stage = 'active'"
        ).fetchall()
    assert len(params) == len(MODELS) * len(PROMPTING)
    assert {value for (value,) in params} == {"gemma3_text+sliding/sdpa/cpu/float32"}
