"""Study grids: sample seeds x few-shot seeds, the mean ± std table and the strategies figure."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, run_snakemake
from scipy import stats

from emoprompt.data.splits import read_split
from emoprompt.evaluation.predictions import Result, score_columns, write_result
from emoprompt.labels import LABELS
from emoprompt.reporting.grid import grid_markdown, grid_table, write_grid_outputs

PNG = b"\x89PNG\r\n\x1a\n"
MODEL = "smol"


def fake_metrics(model: str, strategy: str, f1: float) -> dict:
    per_class = {label: {"f1": f1 / 2} for label in LABELS}
    return {"model": model, "strategy": strategy, "f1_macro": f1, "per_class": per_class,
            "accuracy": f1 + 0.1, "f1_weighted": f1, "unparsed_rate": 0.0, "tweets_per_s": 2.0}


def test_grid_table_is_the_mean_and_std_over_seeds(tmp_path: Path) -> None:
    metrics = [fake_metrics(MODEL, "few_shot_first_token", f) for f in (0.2, 0.3, 0.4, 0.5)]
    metrics += [fake_metrics("baseline", "baseline_tfidf", f) for f in (0.5, 0.6)]
    metrics += [fake_metrics(MODEL, "zero_shot_first_token", 0.1)]
    table = grid_table(metrics, [MODEL])
    assert table[["model", "experiment", "runs"]].values.tolist() == [
        [MODEL, "zero_shot_first_token", 1],
        [MODEL, "few_shot_first_token", 4],
        ["baseline", "baseline_tfidf", 2],
    ]
    few = table.iloc[1]
    assert few["F1 macro mean"] == pytest.approx(0.35)
    assert few["F1 macro std"] == pytest.approx(np.std([0.2, 0.3, 0.4, 0.5], ddof=1))
    assert few["accuracy mean"] == pytest.approx(0.45)
    assert np.isnan(table.iloc[0]["F1 macro std"])  # one run: no spread
    markdown = grid_markdown(table)
    spread = np.std([0.2, 0.3, 0.4, 0.5], ddof=1) / 2
    low, high = stats.t.interval(0.95, 3, loc=0.35, scale=spread)
    assert few["F1 macro ci low"] == pytest.approx(low)
    assert few["F1 macro ci high"] == pytest.approx(high)
    assert np.isnan(table.iloc[0]["F1 macro ci low"])
    cell = f"0.350 ± 0.129 [{low:.3f}, {high:.3f}]"
    assert f"| {MODEL} | few_shot_first_token | 4 | {cell} |" in markdown
    assert f"| {MODEL} | zero_shot_first_token | 1 | 0.100 |" in markdown

    paths = []
    for i, m in enumerate(metrics):
        paths.append(tmp_path / f"m{i}.json")
        paths[-1].write_text(json.dumps(m))
    out = tmp_path / "out"
    write_grid_outputs(paths, out / "t.md", out / "t.csv", out / "f.png", [MODEL])
    assert (out / "f.png").read_bytes().startswith(PNG)
    rows = list(csv.DictReader((out / "t.csv").open(encoding="utf-8")))
    assert [r["runs"] for r in rows] == ["1", "4", "2"]
    assert float(rows[1]["F1 macro std"]) == pytest.approx(0.1291, abs=1e-4)


GRID = ["sample_seeds=[0,1]", "fewshot_seeds=[0,1]"]


def planned(workflow: Path, *args: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of each job of a dry run."""
    out = run_snakemake(workflow, "-n", *args).stdout
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule )", out):
        match = re.match(r"(?:local)?rule (\w+):", block)
        if match:
            wildcards = re.search(r"wildcards: (.*)", block)
            jobs.append((match.group(1), wildcards.group(1) if wildcards else ""))
    return jobs


def test_a_grid_runs_few_shot_strategies_per_seed_pair_and_others_per_sample_seed(
    workflow_dir: Path, data_dir: Path
) -> None:
    strategies = "strategies=[zero_shot_first_token,few_shot_first_token,baseline_tfidf]"
    config = ["--config", f"data_source={data_dir}", strategies]
    jobs = planned(workflow_dir, *config, *GRID)
    model = "model=smollm2-135m-instruct"
    predict = sorted(w for rule, w in jobs if rule == "predict_grid")
    assert predict == sorted(
        [f"sample_seed={s}, fewshot_seed=none, {model}, strategy=zero_shot_first_token"
         for s in (0, 1)]
        + [f"sample_seed={s}, fewshot_seed={f}, {model}, strategy=few_shot_first_token"
           for s in (0, 1) for f in (0, 1)]
    )
    rules = [rule for rule, _ in jobs]
    assert rules.count("baseline_grid") == 2 and rules.count("sample_grid") == 2
    assert rules.count("metrics_grid") == 8
    assert {"grid_table", "track_grid"} <= set(rules)
    assert not {"predict", "baseline", "metrics", "results_table", "track"} & set(rules)

    # Without sample_seeds/fewshot_seeds the run and its paths are the single-seed ones.
    # (its first-token strategies run their prompt families: a grid runs the file's prompt)
    single = {rule for rule, _ in planned(workflow_dir, *config)}
    assert {"predict_family", "baseline", "results_table", "track"} <= single
    assert not any(rule.endswith("_grid") for rule in single)


def fabricate_predictions(workflow: Path, model: str, strategy: str, sample_seed: int,
                          fewshot_seed: int | str) -> None:
    """The files of one grid prediction job, made by hand (no model runs)."""
    sample = read_split(workflow / f"data/processed/sample_seed={sample_seed}/test_sample.tsv")
    rng = np.random.default_rng([sample_seed, 0 if fewshot_seed == "none" else fewshot_seed + 1])
    gold = sample["label"].tolist()
    predicted = [g if rng.random() < 0.5 else str(rng.choice(LABELS)) for g in gold]
    frame = pd.DataFrame({"id": sample["id"], "gold": gold, "predicted": predicted,
                          "parsed": True, "raw": ""})
    for column in score_columns():
        frame[column] = np.nan
    metadata = {"model": model, "strategy": strategy, "tweets": len(frame), "seconds": 1.0,
                "tweets_per_s": float(len(frame)), "device": "cpu"}
    if fewshot_seed != "none":
        metadata["few_shot"] = {"method": "random", "n": 3, "seed": fewshot_seed}
    folder = workflow / f"results/grid/sample_seed={sample_seed}/fewshot_seed={fewshot_seed}"
    write_result(Result(frame, metadata), str(folder / f"predictions/{model}/{strategy}.tsv"),
                 str(folder / f"predictions/{model}/{strategy}.json"))


@pytest.mark.slow
def test_a_two_by_two_grid_gives_the_mean_std_table_the_figure_and_one_run_per_seeds(
    workflow_dir: Path, data_dir: Path
) -> None:
    """Real data, samples, scoring, table, figure and MLflow runs; the prediction files are
    made by hand (a model run per grid cell is the slow part, and is tested elsewhere)."""
    (workflow_dir / "model").mkdir()
    (workflow_dir / "grid.yaml").write_text(yaml.safe_dump({
        "data_source": str(data_dir / "emoeval_data.zip"),
        "sample_size": 12,
        "sample_seeds": [0, 1],
        "fewshot_seeds": [0, 1],
        "models": [MODEL],
        "strategies": ["few_shot_first_token", "baseline_tfidf"],
        "model_catalogue": {MODEL: {"source": "local", "path": "model", "prompt_format": "chat",
                                    "dtype": "float32", "quantization": "none"}},
    }))
    args = ["--configfile", "grid.yaml"]
    samples = [f"data/processed/sample_seed={s}/test_sample.tsv" for s in (0, 1)]
    run_snakemake(workflow_dir, *args, "--", *samples)
    first, second = (read_split(workflow_dir / p) for p in samples)
    assert len(first) == len(second) == 12 and set(first["id"]) != set(second["id"])

    runs = [(MODEL, "few_shot_first_token", s, f) for s in (0, 1) for f in (0, 1)]
    runs += [("baseline", "baseline_tfidf", s, "none") for s in (0, 1)]
    for run in runs:
        fabricate_predictions(workflow_dir, *run)
    targets = ["results/grid_table.md", "results/grid_table.csv",
               "results/figures/strategies_by_model.png", "results/grid/mlflow_runs.tsv"]
    args += ["--rerun-triggers", "mtime"]
    plan = {rule for rule, _ in planned(workflow_dir, *args, "--", *targets)}
    assert plan == {"metrics_grid", "grid_table", "track_grid"}  # the predictions are there
    run_snakemake(workflow_dir, *args, "--", *targets)

    table = pd.read_csv(workflow_dir / "results/grid_table.csv")
    assert table[["model", "experiment", "runs"]].values.tolist() == [
        [MODEL, "few_shot_first_token", 4], ["baseline", "baseline_tfidf", 2]]
    for _, row in table.iterrows():
        f1 = [json.loads((workflow_dir / f"results/grid/sample_seed={s}/fewshot_seed={f}"
                          f"/metrics/{m}/{t}.json").read_text())["f1_macro"]
              for m, t, s, f in runs if (m, t) == (row["model"], row["experiment"])]
        assert row["F1 macro mean"] == pytest.approx(np.mean(f1), abs=1e-4)
        assert row["F1 macro std"] == pytest.approx(np.std(f1, ddof=1), abs=1e-4)
    markdown = (workflow_dir / "results/grid_table.md").read_text()
    assert "| runs |" in markdown and " ± " in markdown
    figure = workflow_dir / "results/figures/strategies_by_model.png"
    assert figure.read_bytes().startswith(PNG)
    pooled = pd.read_csv(workflow_dir / "results/grid_comparisons.csv")
    few = f"{MODEL}/few_shot_first_token"
    assert pooled[["a", "b", "samples", "runs_a", "runs_b"]].values.tolist() == [
        [few, "baseline/baseline_tfidf", 2, 4, 2],
        [few, "floor/always_Otras", 2, 4, 2],
        ["baseline/baseline_tfidf", "floor/always_Otras", 2, 2, 2],
    ]
    assert (pooled["difference_low"] <= pooled["difference"]).all()

    tracked = pd.read_csv(workflow_dir / "results/grid/mlflow_runs.tsv", sep="\t")
    assert sorted(tracked["key"]) == sorted(
        [f"{MODEL}/few_shot_first_token/sample=12,random,seed={s},fewshot_seed={f}"
         for s in (0, 1) for f in (0, 1)]
        + [f"baseline/baseline_tfidf/sample=12,random,seed={s}" for s in (0, 1)]
    )
    assert set(tracked["action"]) == {"created"}


@pytest.mark.slow
def test_the_few_shot_seed_of_a_grid_changes_the_shots(tmp_path: Path, tiny_llama_dir: Path):
    from emoprompt.evaluation.job import run_prediction

    rng = np.random.default_rng(0)
    rows = [{"id": f"t{i}", "event": "e", "tweet": f"tuit número {i}", "offensive": "NO",
             "label": LABELS[int(rng.integers(len(LABELS)))]} for i in range(40)]
    pd.DataFrame(rows[:36]).to_csv(tmp_path / "train.tsv", sep="\t", index=False)
    pd.DataFrame(rows[36:38]).to_csv(tmp_path / "sample.tsv", sep="\t", index=False)
    entry = {"source": "local", "path": str(tiny_llama_dir), "prompt_format": "chat",
             "dtype": "float32", "quantization": "none", "allow_fallback": False,
             "location": str(tiny_llama_dir)}
    shots = {}
    for seed in (None, 0, 1):
        settings = {"fallback_label": "Otras", "engine": {"batch_size": 2, "threads": 1}}
        if seed is not None:
            settings["fewshot_seed"] = seed
        out = tmp_path / f"seed{seed}"
        run_prediction(model_name="tiny", entry=entry,
                       strategy_name="few_shot_first_token",
                       prompt_path=str(REPO / "prompts" / "few_shot.yaml"),
                       train_path=str(tmp_path / "train.tsv"),
                       sample_path=str(tmp_path / "sample.tsv"), settings=settings,
                       job_threads=1, tsv_out=str(out / "p.tsv"), json_out=str(out / "p.json"))
        shots[seed] = json.loads((out / "p.json").read_text())["few_shot"]
    assert shots[None]["seed"] == 0 and shots[None]["ids"] == shots[0]["ids"]  # the file's
    assert shots[1]["seed"] == 1 and shots[1]["ids"] != shots[0]["ids"]
