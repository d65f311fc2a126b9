"""The main job end to end on the embedded model (a small sample): every default strategy
writes its files (the fine-tuned model's and the probe's with small settings), and the
results table equals scikit-learn on the prediction files."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from conftest import copy_workflow, run_snakemake
from sklearn.metrics import accuracy_score, f1_score

from emoprompt.evaluation.predictions import read_predictions
from emoprompt.labels import LABELS

pytestmark = pytest.mark.slow

# The default study with a fine-tune and a probe small enough for a test: a validation
# split of 70 tweets, 3 training steps, a probe fitted on 70 tweets.
SMALL = """\
validation_size: 70
finetune: {train_size: 48, max_steps: 3, batch_size: 8, max_length: 64}
probe: {train_size: 70, C: [0.1, 1.0], layers: [10, 20]}
prompt_variants: {validation_size: 6}
"""
# The default prompt families: 4 instructions x 2 verbalizers x 3 calibrations.
FAMILIES = {"zero_shot_first_token": 24, "few_shot_first_token": 24}
DEFAULT_ROWS = [
    ("smollm2-135m-instruct", "zero_shot_generate"),
    ("smollm2-135m-instruct", "zero_shot_first_token"),
    ("smollm2-135m-instruct", "few_shot_generate"),
    ("smollm2-135m-instruct", "few_shot_first_token"),
    ("smollm2-135m-instruct-ft", "finetuned_first_token"),
    ("smollm2-135m-instruct", "zero_shot_label_likelihood"),
    ("smollm2-135m-instruct", "few_shot_label_likelihood"),
    ("smollm2-135m-instruct", "linear_probe"),
    ("baseline", "baseline_tfidf"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir: Path, smollm2_dir: Path) -> Path:
    workflow = copy_workflow(tmp_path_factory.mktemp("full") / "wf")
    # The embedded model converted once for the tests stands in for convert_model's output.
    (workflow / "data" / "models").mkdir(parents=True)
    (workflow / "data" / "models" / "smollm2-135m-instruct").symlink_to(smollm2_dir)
    (workflow / "small.yaml").write_text(SMALL, encoding="utf-8")
    run_snakemake(
        workflow,
        "--resources",
        "gpu=1",
        "--configfile",
        "small.yaml",
        "--config",
        f"data_source={data_dir / 'emoeval_data.zip'}",
        "sample_size=6",
        "sample_scheme=stratified",
    )
    return workflow


def test_every_default_strategy_wrote_its_files(finished_run: Path):
    folder = finished_run / "results" / "predictions"
    for model, strategy in DEFAULT_ROWS[:-1]:
        frame = read_predictions(folder / model / f"{strategy}.tsv")
        assert len(frame) == 6
        meta = json.loads((folder / model / f"{strategy}.json").read_text())
        keys = ("model", "device", "dtype", "tweets_per_s", "versions")
        if strategy != "linear_probe":
            keys += ("prompt_sha256",)
        for key in keys:
            assert meta.get(key) is not None, (strategy, key)
    assert (finished_run / "results" / "inspect" / "smollm2-135m-instruct.md").is_file()


def test_the_table_has_the_notebooks_five_rows_first_then_the_others(finished_run: Path):
    table = pd.read_csv(finished_run / "results" / "results_table.csv")
    assert list(zip(table["model"], table["experiment"], strict=True)) == DEFAULT_ROWS
    # the tuned rows (the families' chosen variants too) carry their validation score
    tuned = table["experiment"].isin(["finetuned_first_token", "linear_probe", *FAMILIES])
    assert table.loc[tuned, "validation F1 macro"].notna().all()
    assert table.loc[~tuned, "validation F1 macro"].isna().all()


def test_the_validation_split_stays_out_of_training_and_shots(finished_run: Path):
    from emoprompt.data.splits import read_split

    processed = finished_run / "data" / "processed"
    held_out = set(read_split(processed / "validation.tsv")["id"]) | set(
        read_split(processed / "test.tsv")["id"]
    )
    assert len(read_split(processed / "validation.tsv")) == 70
    adapter = finished_run / "data" / "models" / "smollm2-135m-instruct-ft"
    trained = set((adapter / "train_ids.txt").read_text().split())
    assert len(trained) == 48 and not trained & held_out
    record = json.loads((adapter / "training_config.json").read_text())
    assert record["validation"]["tweets"] == 70
    probe = json.loads((finished_run / "results" / "predictions" / "smollm2-135m-instruct"
                        / "linear_probe.json").read_text())
    assert probe["validation"]["tweets"] == 70 and probe["probe"]["train_tweets"] == 70
    assert len(probe["probe"]["candidates"]) == 4  # two layers x two C, chosen on validation
    shots = json.loads((finished_run / "results" / "predictions" / "smollm2-135m-instruct"
                        / "few_shot_first_token.json").read_text())["few_shot"]
    shot_ids = set(shots.get("ids") or shots.get("shared") or [])
    assert shot_ids and not shot_ids & held_out


def test_results_table_equals_scikit_learn_on_the_predictions(finished_run: Path):
    table = pd.read_csv(finished_run / "results" / "results_table.csv")
    predictions = sorted((finished_run / "results" / "predictions").glob("*/*.tsv"))
    assert len(table) == len(predictions) == len(DEFAULT_ROWS)
    for path in predictions:
        model, strategy = path.parent.name, path.stem
        row = table[(table["model"] == model) & (table["experiment"] == strategy)]
        assert len(row) == 1, (model, strategy)
        frame = read_predictions(path)
        gold, pred = frame["gold"], frame["predicted"]
        per_class = f1_score(gold, pred, labels=list(LABELS), average=None, zero_division=0)
        expected = {
            "F1 macro": f1_score(gold, pred, labels=list(LABELS), average="macro", zero_division=0),
            "F1 Alegría": per_class[0],
            "F1 Tristeza": per_class[1],
            "F1 Otras": per_class[6],
            "accuracy": accuracy_score(gold, pred),
            "unparsed %": 100 * (~frame["parsed"]).mean(),
        }
        for column, value in expected.items():
            assert row[column].iloc[0] == pytest.approx(value, abs=1e-3), (model, strategy, column)


def test_one_mlflow_run_per_model_and_strategy(finished_run: Path):
    with sqlite3.connect(finished_run / "results" / "mlflow.db") as db:
        keys = db.execute(
            "SELECT t.value FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
            "WHERE t.key = 'emoprompt.key' AND r.lifecycle_stage = 'active'"
        ).fetchall()
        children = db.execute(
            "SELECT t.value, COUNT(*) FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
            "WHERE t.key = 'emoprompt.strategy' AND r.lifecycle_stage = 'active' AND "
            "r.run_uuid IN (SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId') "
            "GROUP BY t.value"
        ).fetchall()
        # one registered version per distinct prompt text, each linked to its runs
        versions = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT value) FROM model_version_tags "
            "WHERE key = 'emoprompt.prompt_sha256'"
        ).fetchone()
        linked = db.execute(
            "SELECT COUNT(*) FROM tags WHERE key = 'mlflow.linkedPrompts'"
        ).fetchone()[0]
        inputs = dict(
            db.execute(
                "SELECT it.value, COUNT(*) FROM inputs i JOIN input_tags it ON "
                "it.input_uuid = i.input_uuid WHERE it.name = 'mlflow.data.context' "
                "GROUP BY it.value"
            ).fetchall()
        )
    runs = len(DEFAULT_ROWS) + 1 + sum(FAMILIES.values())  # the training run, the variants
    assert len(keys) == runs and len(set(keys)) == runs
    assert dict(children) == FAMILIES
    digests = {
        variant["run"]["prompt_sha256"]
        for strategy in FAMILIES
        for variant in json.loads(
            (finished_run / VARIANTS / strategy / "variants.json").read_text()
        )["variants"]
    }
    prompted = [s for m, s in DEFAULT_ROWS if s not in ("linear_probe", "baseline_tfidf")]
    # the families' prompts (8 texts each) and the single prompts of the other strategies
    assert versions[0] == versions[1] >= len(digests) == 16
    assert linked == len(prompted) + sum(FAMILIES.values())
    # every run logs its evaluation sample; shots, training, the probe and the baseline
    # the train split; the families (parents and children) their validation sample
    assert inputs["evaluation"] == len(DEFAULT_ROWS) + sum(FAMILIES.values())
    assert inputs["validation"] == len(FAMILIES) + sum(FAMILIES.values())
    assert inputs["training"] == 6
    # how each model run computed: its backend, model key and speed-ups are parameters
    with sqlite3.connect(finished_run / "results" / "mlflow.db") as db:
        params = dict(
            db.execute(
                "SELECT p.key, p.value FROM params p JOIN runs r ON r.run_uuid = p.run_uuid "
                "JOIN tags t ON t.run_uuid = r.run_uuid WHERE t.key = 'emoprompt.key' "
                "AND t.value LIKE 'smollm2-135m-instruct/zero_shot_first_token/%' "
                "AND r.lifecycle_stage = 'active'"
            ).fetchall()
        )
    assert params["backend"] == "engine"
    assert params["model_key"] == "llama/sdpa/cpu/float32"
    assert "prefix_reuse" in params["speedups"].split(",")


MODEL = "smollm2-135m-instruct"
VARIANTS = f"results/variants/{MODEL}"


def test_the_families_rows_are_their_variants_chosen_on_validation(finished_run: Path):
    results = finished_run / "results"
    table = pd.read_csv(results / "results_table.csv").fillna("")
    sensitivity = pd.read_csv(results / "prompt_sensitivity.csv")
    assert sorted(sensitivity["strategy"]) == sorted(FAMILIES)
    assert (results / "figures" / "prompt_sensitivity.png").stat().st_size > 10_000
    for strategy, size in FAMILIES.items():
        choice = json.loads((finished_run / VARIANTS / strategy / "choice.json").read_text())
        row = table[table["experiment"] == strategy]
        marked = f"chosen on validation: {choice['chosen']} of {size}"
        assert row["prompt"].iloc[0].startswith(marked)
        test = read_predictions(finished_run / VARIANTS / strategy / "test.tsv")
        chosen = test[test["variant"] == choice["chosen"]].drop(columns="variant")
        written = read_predictions(results / "predictions" / MODEL / f"{strategy}.tsv")
        pd.testing.assert_frame_equal(chosen.reset_index(drop=True), written)
        spread = sensitivity[sensitivity["strategy"] == strategy].iloc[0]
        assert spread["variants"] == size and spread["chosen"] == choice["chosen"]
        assert spread["chosen F1 macro"] == pytest.approx(row["F1 macro"].iloc[0], abs=1e-4)
    others = table[~table["experiment"].isin(list(FAMILIES))]
    assert (others["prompt"] == "").all()


def _intervals(workflow: Path) -> dict[str, dict]:
    return {
        path.parent.name + "/" + path.stem: json.loads(path.read_text())["intervals"]
        for path in sorted((workflow / "results" / "metrics").glob("*/*.json"))
    }


def test_every_row_has_its_interval_and_every_pair_its_test(finished_run: Path):
    table = pd.read_csv(finished_run / "results" / "results_table.csv")
    assert (table["F1 macro low"] <= table["F1 macro"] + 1e-9).all()
    assert (table["F1 macro"] <= table["F1 macro high"] + 1e-9).all()
    markdown = (finished_run / "results" / "results_table.md").read_text()
    assert "cannot be told apart from chance" in markdown
    comparisons = pd.read_csv(finished_run / "results" / "comparisons.csv")
    rows = [f"{m}/{s}" for m, s in zip(table["model"], table["experiment"], strict=True)
            if s != "baseline_tfidf"]
    pairs = {(a, b) for a, b in zip(comparisons["a"], comparisons["b"], strict=True)}
    unordered = {frozenset(pair) for pair in pairs}
    for i, a in enumerate(rows):  # the fine-tuned row is compared with its base's rows too
        for b in rows[i + 1 :]:
            assert frozenset((a, b)) in unordered, (a, b)
        assert (a, "baseline/baseline_tfidf") in pairs and (a, "floor/always_Otras") in pairs
    assert len(comparisons) == len(rows) * (len(rows) - 1) // 2 + len(rows) + len(rows) + 1
    for name in ("macro_f1_intervals.png", "macro_f1_differences.png"):
        assert (finished_run / "results" / "figures" / name).stat().st_size > 10_000


def test_aggregating_again_gives_the_same_intervals_and_no_new_runs(
    finished_run: Path, data_dir: Path
):
    before = _intervals(finished_run)
    comparisons = (finished_run / "results" / "comparisons.csv").read_text()
    result = run_snakemake(
        finished_run,
        "--resources",
        "gpu=1",
        "--forcerun",
        "metrics",
        "--configfile",
        "small.yaml",
        "--config",
        "sample_size=6",
        "sample_scheme=stratified",
        f"data_source={data_dir / 'emoeval_data.zip'}",
    )
    assert _intervals(finished_run) == before
    assert (finished_run / "results" / "comparisons.csv").read_text() == comparisons
    assert "Rule: metrics" in result.stderr and "Rule: predict" not in result.stderr
    test_one_mlflow_run_per_model_and_strategy(finished_run)
