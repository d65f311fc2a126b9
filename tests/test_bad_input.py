"""Bad input is refused early and clearly: config errors in a few lines that name the key
and its source, and prompt files or few-shot settings that cannot work refused when the
workflow starts (a dry run fails) or, with the data, before a model loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, run_snakemake

from emoprompt.data.splits import write_split
from emoprompt.evaluation.job import run_prediction
from emoprompt.infra.config_check import config_problems
from emoprompt.labels import LABELS
from emoprompt.prompting.prompt_file import PromptError

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
# Snakemake's own lines around a WorkflowError: the "extended by --config" note, the
# "WorkflowError in file" header and the traceback lines that follow the message.
SNAKEMAKE_LINE = re.compile(r"^(Config file .* extended|WorkflowError in file|  File \")")


def dry_run_error(workflow: Path, *config: str) -> list[str]:
    """The lines a failed dry run prints that are not Snakemake's own."""
    result = run_snakemake(workflow, "-n", *(("--config", *config) if config else ()), check=False)
    assert result.returncode != 0, result.stdout
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) <= 10, "\n".join(lines)
    return [line for line in lines if not SNAKEMAKE_LINE.match(line)]


def test_a_misspelt_key_is_named_with_its_source_and_the_likely_key(workflow_dir):
    message = "\n".join(dry_run_error(workflow_dir, "sample_sise=10"))
    assert "unknown key 'sample_sise' (from --config" in message
    assert "did you mean 'sample_size'?" in message
    assert "Failed validating" not in message and "$schema" not in message


def test_a_bad_value_in_config_yaml_is_named_with_what_is_allowed(workflow_dir):
    config = workflow_dir / "config.yaml"
    config.write_text(config.read_text().replace("sample_scheme: random", "sample_scheme: rand"))
    message = "\n".join(dry_run_error(workflow_dir))
    assert "sample_scheme = 'rand' (from config.yaml): must be one of random, stratified" in message


def test_a_configfile_is_named_as_the_source(tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("statistics:\n  confidence: 2\n")
    config = {**_defaults(), "statistics": {"confidence": 2}}
    problems = config_problems(config, SCHEMA, overrides={}, configfiles=[extra])
    assert problems == [f"statistics.confidence = 2 (from {extra}): 2 is greater than or "
                        "equal to the maximum of 1"]
    assert config_problems(_defaults(), SCHEMA) == []


def _defaults() -> dict:
    import yaml

    return yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("line", "replacement", "expected"),
    [
        ("shots: 10", "shots: 0", "prompts/few_shot.yaml: 'shots' is 0"),
        ("selection: random", "selection: bogus", "'selection' 'bogus' is not a few-shot method"),
        ("selection: random", "selection: manual", "'manual_ids' holds 0 ids but 'shots' is 10"),
    ],
)
def test_a_dry_run_fails_on_few_shot_settings_that_cannot_work(
    workflow_dir, line, replacement, expected
):
    prompt = workflow_dir / "prompts" / "few_shot.yaml"
    prompt.write_text(prompt.read_text().replace(line, replacement))
    assert expected in "\n".join(dry_run_error(workflow_dir))


def _splits(workflow: Path, n: int = 40) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "id": [f"t{i}" for i in range(n)],
            "event": "X",
            "tweet": [f"tuit número {i}" for i in range(n)],
            "offensive": "NO",
            "label": [LABELS[i % len(LABELS)] for i in range(n)],
        }
    )
    folder = workflow / "data" / "processed"
    folder.mkdir(parents=True)
    write_split(frame.iloc[: n - 10], folder / "train.tsv")
    write_split(frame.iloc[n - 10 :].reset_index(drop=True), folder / "test.tsv")
    return frame


def test_the_prediction_job_refuses_impossible_shots_before_loading_a_model(tmp_path):
    frame = _splits(tmp_path)
    prompt = tmp_path / "few_shot.yaml"
    prompt.write_text((REPO / "prompts" / "few_shot.yaml").read_text().replace(
        "shots: 10", "shots: 1000"))
    sample = tmp_path / "sample.tsv"
    write_split(frame.iloc[30:].reset_index(drop=True), sample)
    with pytest.raises(PromptError, match=r"few_shot.yaml: 'shots': 1000 shots asked"):
        run_prediction(
            model_name="absent",
            # loading it would fail differently
            entry={"source": "local", "prompt_format": "chat",
                   "location": str(tmp_path / "no-such-model")},
            strategy_name="few_shot_first_token",
            prompt_path=str(prompt),
            train_path=str(tmp_path / "data" / "processed" / "train.tsv"),
            sample_path=str(sample),
            settings={"engine": {}},
            job_threads=1,
            tsv_out=str(tmp_path / "out.tsv"),
            json_out=str(tmp_path / "out.json"),
        )
    assert not (tmp_path / "out.tsv").exists()


# ------------------------------------------------------------------ the model's context
# 20,000 characters, 14,000 tokens: over SmolLM2's context of 8,192.
LONG_TWEET = " ".join(f"día{i}" for i in range(2680))[:20_000]


@pytest.fixture(scope="module")
def train_split(tmp_path_factory, data_dir: Path) -> Path:
    """The real train split, prepared as the workflow prepares it."""
    from emoprompt.data.splits import locate_splits, parse_split

    path = tmp_path_factory.mktemp("splits") / "train.tsv"
    write_split(parse_split(locate_splits(data_dir)["train"]), path)
    return path


def _job(tmp_path: Path, model_dir: Path, train: Path, tweets: list[str], name: str,
         strategy: str = "zero_shot_first_token", prompt: Path | None = None) -> Path:
    sample = tmp_path / f"{name}.tsv"
    write_split(pd.DataFrame({
        "id": [f"{name}{i}" for i in range(len(tweets))], "event": "X", "tweet": tweets,
        "offensive": "NO", "label": [LABELS[i % 7] for i in range(len(tweets))],
    }), sample)
    family = "few_shot" if strategy.startswith("few_shot") else "zero_shot"
    run_prediction(
        model_name="smollm2-135m-instruct",
        entry={"source": "local", "prompt_format": "chat", "dtype": "float32",
               "location": str(model_dir)},
        strategy_name=strategy,
        prompt_path=str(prompt or REPO / "prompts" / f"{family}.yaml"),
        train_path=str(train),
        sample_path=str(sample),
        settings={"engine": {"threads": 2}},
        job_threads=2,
        tsv_out=str(tmp_path / f"{name}.out.tsv"),
        json_out=str(tmp_path / f"{name}.out.json"),
    )
    return tmp_path / f"{name}.out"


@pytest.mark.slow
def test_a_tweet_longer_than_the_context_is_cut_to_fit_and_flagged(
    tmp_path, smollm2_dir, train_split
):
    import json

    from emoprompt.evaluation.predictions import read_predictions, score_columns

    tweets = ["¡Qué alegría!", LONG_TWEET, "Tengo miedo de mañana"]
    out = _job(tmp_path, smollm2_dir, train_split, tweets, "long")
    frame = read_predictions(f"{out}.tsv")
    assert frame["truncated"].tolist() == [False, True, False]
    assert frame[score_columns()].sum(axis=1).tolist() == pytest.approx([1, 1, 1], abs=1e-5)
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["truncated"] == 1 and meta["truncated_ids"] == ["long1"]
    assert meta["longest_prompt_tokens"] <= meta["prompt_token_limit"] < meta["context_tokens"]
    assert meta["context_tokens"] == 8192 and meta["longest_prompt_tokens"] > 8000
    # What reproduces it: the weights, the sample, the versions, the commit.
    assert meta["weights_sha256"] and len(meta["weights_sha256"]) == 64
    assert meta["sample"]["sha256"] and meta["sample"]["file"].endswith("long.tsv")
    assert {"torch", "transformers", "tokenizers", "peft", "accelerate"} <= set(meta["versions"])
    assert meta["git_commit"] == "unknown"  # this job was given no checkout


def test_shots_that_cannot_fit_the_context_stop_the_job_before_the_model_loads(
    tmp_path, smollm2_dir, train_split, monkeypatch
):
    from emoprompt.evaluation.context import ContextError
    from emoprompt.models import loading

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", never)
    prompt = tmp_path / "few_shot.yaml"
    prompt.write_text((REPO / "prompts" / "few_shot.yaml").read_text().replace(
        "shots: 10", "shots: 1000"))
    with pytest.raises(ContextError) as error:
        _job(tmp_path, smollm2_dir, train_split, ["hola"], "shots",
             strategy="few_shot_first_token", prompt=prompt)
    message = str(error.value)
    assert str(prompt) in message and "with 1000 shots" in message and "8,192" in message


PEAK_SCRIPT = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from test_bad_input import _job
from pathlib import Path
tweets = json.loads(sys.argv[5])
_job(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), tweets, "peak")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_a_long_tweet_costs_little_more_memory_than_a_normal_job(
    tmp_path, smollm2_dir, train_split
):
    """Each job in a process of its own: its peak resident memory, with and without a
    20,000-character tweet in its sample of eight."""
    import json
    import subprocess
    import sys

    normal = [f"Hoy es un día {word} en el estadio" for word in
              ("feliz", "triste", "raro", "largo", "frío", "bonito", "tenso", "histórico")]
    peaks = {}
    for name, tweets in (("normal", normal), ("long", [*normal[:7], LONG_TWEET])):
        folder = tmp_path / name
        folder.mkdir()
        result = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(REPO / "tests"), str(folder),
             str(smollm2_dir), str(train_split), json.dumps(tweets)],
            capture_output=True, text=True, check=True,
        )
        peaks[name] = int(result.stdout.strip().splitlines()[-1])
    print(f"peak resident memory (KiB): {peaks}")
    assert peaks["long"] <= 1.5 * peaks["normal"], peaks


# ------------------------------------------------------------------ interruptions
@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_an_interrupted_run_stops_its_job_at_once_and_leaves_no_output(
    workflow_dir, data_dir, smollm2_dir, signal_name
):
    import os
    import signal
    import subprocess
    import time

    from conftest import BIN

    (workflow_dir / "data" / "models").mkdir(parents=True)
    (workflow_dir / "data" / "models" / "smollm2-135m-instruct").symlink_to(smollm2_dir)
    target = "results/predictions/smollm2-135m-instruct/few_shot_generate.tsv"
    log = workflow_dir / "logs" / "predict" / "smollm2-135m-instruct" / "few_shot_generate.log"
    run = subprocess.Popen(
        [str(BIN / "snakemake"), "--cores", "2", "--resources", "gpu=1", "--config",
         f"data_source={data_dir / 'emoeval_data.zip'}", "sample_size=60", "--", target],
        cwd=workflow_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # the signal reaches Snakemake alone, not a process group
    )
    try:
        deadline = time.monotonic() + 300
        while not (log.is_file() and "generation:" in log.read_text(errors="replace")):
            assert run.poll() is None and time.monotonic() < deadline, "the job never started"
            time.sleep(0.5)
        os.kill(run.pid, getattr(signal, signal_name))
        output, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0
    assert "interrupted" in log.read_text(errors="replace")
    folder = (workflow_dir / target).parent  # not even a temporary file left
    assert not folder.exists() or not any(folder.iterdir()), output[-2000:]


def test_an_empty_system_prompt_is_a_warning_not_an_error(workflow_dir):
    import yaml

    path = workflow_dir / "prompts" / "zero_shot.yaml"
    prompt = yaml.safe_load(path.read_text(encoding="utf-8"))
    path.write_text(yaml.safe_dump({**prompt, "system": " "}, allow_unicode=True))
    result = run_snakemake(workflow_dir, "-n")  # a dry run passes, with the warning
    assert "prompts/zero_shot.yaml: 'system' is empty" in result.stdout + result.stderr


def test_the_readme_says_how_to_call_snakemake_and_recover_from_a_crash():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for text in (".venv/bin/snakemake", "source .venv/bin/activate", "SNAKEMAKE_ARGS",
                 "--unlock", "--rerun-incomplete", "half-written"):
        assert text in readme, text


def test_calibration_with_shots_chosen_per_tweet_is_refused_by_a_dry_run(workflow_dir):
    prompt = workflow_dir / "prompts" / "few_shot.yaml"
    prompt.write_text(prompt.read_text().replace("selection: random", "selection: similar"))
    extra = workflow_dir / "calibrated.yaml"
    for setting in ("scoring:\n  calibrate: true\nprompt_variants: {strategies: []}\n",
                    "prompt_variants: {calibration: [none, contextual]}\n"):  # fmt: skip
        extra.write_text(setting)
        result = run_snakemake(workflow_dir, "-n", "--configfile", str(extra), check=False)
        assert result.returncode != 0
        message = result.stdout + result.stderr
        assert "prompts/few_shot.yaml: 'selection' 'similar' chooses the shots per tweet" in message
        assert setting.split(":")[0] in message  # the setting that asks for it
    # without contextual calibration: fine
    extra.write_text("prompt_variants: {calibration: [none, batch]}\n")
    run_snakemake(workflow_dir, "-n", "--configfile", str(extra))


@pytest.mark.slow
def test_a_served_entry_is_checked_by_a_dry_run_and_a_chat_api_skips_label_likelihood(
    workflow_dir,
):
    extra = workflow_dir / "served.yaml"
    served = {"source": "openai", "base_url": "http://127.0.0.1:9/v1", "served_model": "m"}

    def dry_run(entry):
        extra.write_text(
            json.dumps({"models": ["smollm2-135m-instruct", "m"], "model_catalogue": {"m": entry}})
        )
        return run_snakemake(workflow_dir, "-n", "--configfile", str(extra), check=False)

    result = dry_run({**served, "prompt_format": "chat"})
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "model_catalogue: m is served (source: openai) and needs tokenizer" in message
    result = dry_run({**served, "api": "chat", "prompt_format": "plain"})
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "api: chat sends chat turns and needs prompt_format: chat" in message
    result = dry_run({**served, "api": "chat", "prompt_format": "chat"})  # no tokenizer: fine
    assert result.returncode == 0, result.stdout
    log = result.stdout + result.stderr
    assert "m uses a chat API (api: chat)" in log and "not run for it" in log
    assert "predictions/m/zero_shot_first_token.tsv" in log
    assert "predictions/m/zero_shot_label_likelihood.tsv" not in log
    assert "predictions/smollm2-135m-instruct/zero_shot_label_likelihood.tsv" in log
