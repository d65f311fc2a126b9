"""The aggregation rules and the Snakemake report, on hand-made prediction files."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_snakemake

from emoprompt.evaluation.predictions import Result, score_columns, write_result
from emoprompt.labels import LABELS

PAIRS = [
    ("tiny", "zero_shot_first_token"),
    ("tiny", "zero_shot_generate"),
    ("baseline", "baseline_tfidf"),
]
# A local "model" and a local data folder: nothing is downloaded, no model is loaded.
TEST_CONFIG = """\
data_source: src_data
models: [tiny]
strategies: [zero_shot_first_token, zero_shot_generate, baseline_tfidf]
prompt_variants: {strategies: []}
sample_size: 30
model_catalogue:
  tiny: {source: local, path: models/tiny, prompt_format: chat}
"""
UPSTREAM = [  # what the data, model and inspection steps would have written
    "data/raw/provenance.json",
    "data/processed/train.tsv",
    "data/processed/validation.tsv",
    "data/processed/test.tsv",
    "data/processed/split_ids.json",
    "data/processed/test_sample.tsv",
    "results/data/class_distribution.tsv",
    "results/inspect/tiny.md",
]


def write_predictions(root: Path, model: str, strategy: str, seed: int) -> None:
    gold = np.random.default_rng(100).choice(LABELS, 30).tolist()  # one sample for all runs
    rng = np.random.default_rng(seed)
    predicted = [g if rng.random() < 0.5 else str(rng.choice(LABELS)) for g in gold]
    frame = pd.DataFrame({"id": [str(i) for i in range(30)], "gold": gold,
                          "predicted": predicted, "parsed": rng.random(30) > 0.1, "raw": ""})
    for column in score_columns():
        frame[column] = np.nan
    metadata = {"model": model, "strategy": strategy, "tweets": 30, "seconds": 3.0,
                "tweets_per_s": 10.0, "prompt_sha256": "a" * 64,
                "messages": [{"role": "user", "content": "{tweet}"}]}
    base = root / "results" / "predictions" / model / strategy
    write_result(Result(frame, metadata), f"{base}.tsv", f"{base}.json")


def set_mtime(path: Path, when: float) -> None:
    os.utime(path, (when, when))


@pytest.fixture
def results_tree(workflow_dir: Path) -> Path:
    """The workflow copy with every file up to the predictions in place and up to date."""
    root = workflow_dir
    (root / "test_config.yaml").write_text(TEST_CONFIG, encoding="utf-8")
    now = 1_700_000_000.0
    for folder in ("src_data", "data/raw/emoeval_data", "models/tiny"):
        (root / folder).mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (root / "src_data" / name).write_text("x\n", encoding="utf-8")
        set_mtime(root / "src_data" / name, now - 300)
    set_mtime(root / "src_data", now - 300)
    for name in UPSTREAM:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x\n", encoding="utf-8")
        set_mtime(root / name, now - 200)
    for folder in ("data/raw/emoeval_data", "models/tiny"):
        set_mtime(root / folder, now - 200)
    for prompt in (root / "prompts").iterdir():
        set_mtime(prompt, now - 200)
    for seed, (model, strategy) in enumerate(PAIRS):
        write_predictions(root, model, strategy, seed)
        for ext in ("tsv", "json"):
            set_mtime(root / f"results/predictions/{model}/{strategy}.{ext}", now - 100)
    return root


@pytest.mark.slow
def test_aggregation_and_report(results_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = results_tree
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run's own SQLite store
    # Only the aggregation rules may run: every upstream file is up to date.
    run_snakemake(root, "--configfile", "test_config.yaml",
                  "--allowed-rules", "metrics", "compare", "results_table", "track", "all")

    for model, strategy in PAIRS:
        assert (root / f"results/metrics/{model}/{strategy}.json").is_file()
        assert (root / f"results/figures/confusion_{model}_{strategy}.png").is_file()
        assert (root / f"logs/metrics/{model}/{strategy}.log").is_file()
    table = pd.read_csv(root / "results/results_table.csv")
    # The notebook's order: zero-shot generate before zero-shot first token, baseline last.
    assert table["experiment"].tolist() == [
        "zero_shot_generate", "zero_shot_first_token", "baseline_tfidf"
    ]
    assert table.columns[2:6].tolist() == ["F1 macro", "F1 Alegría", "F1 Tristeza", "F1 Otras"]
    assert (root / "results/results_table.md").read_text(encoding="utf-8").startswith(
        "| model | experiment | F1 macro |"
    )
    runs = pd.read_csv(root / "results/mlflow_runs.tsv", sep="\t")
    assert sorted(zip(runs["model"], runs["strategy"], strict=True)) == sorted(PAIRS)
    assert runs["key"].str.endswith("/sample=30,random,seed=0").all()
    assert (root / "results/mlflow.db").is_file()
    assert any((root / "results/mlartifacts").rglob("*.png"))

    run_snakemake(root, "--configfile", "test_config.yaml", "--report", "results/report.html")
    html = (root / "results/report.html").read_text(encoding="utf-8")
    reported = [f"results/figures/confusion_{m}_{s}.png" for m, s in PAIRS]
    reported += ["results/results_table.csv", "results/results_table.md"]
    reported += [f"results/figures/macro_f1_{kind}.png" for kind in ("intervals", "differences")]
    reported += ["results/comparisons.md", "results/comparisons.csv"]
    for name in reported:  # each file embedded, as a base64 data URI
        assert base64.b64encode((root / name).read_bytes()).decode() in html, name
    # The captions: the table itself, rendered, and one caption per confusion matrix.
    assert "The results table: one row per model and experiment" in html
    assert re.search(r"<td>tiny</td>(\\n|\s)*<td>zero_shot_generate</td>", html)
    assert re.search(r"<td>baseline</td>(\\n|\s)*<td>baseline_tfidf</td>", html)
    for model, strategy in PAIRS:
        caption = (rf"Confusion matrices of <strong>{model}</strong> with the strategy"
                   rf"(\\n|\s)*<strong>{strategy}</strong>")
        assert re.search(caption, html), (model, strategy)
