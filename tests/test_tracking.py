"""MLflow tracking: idempotent logging into a SQLite store, then read back through a server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import BIN, REPO
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from emoprompt.evaluation.metrics import write_metrics
from emoprompt.evaluation.predictions import Result, score_columns, write_result
from emoprompt.labels import LABELS
from emoprompt.reporting.results import write_confusion_figure
from emoprompt.tracking import (
    KEY_TAG,
    SUPERSEDED_TAG,
    RunFiles,
    default_tracking_uri,
    git_commit,
    resolve_tracking_uri,
    run_key,
    track_runs,
    write_run_list,
)

SAMPLE = {"size": 30, "scheme": "random", "seed": 0}
PAIRS = [
    ("smol", "zero_shot_generate"),
    ("smol", "finetuned_first_token"),
    ("baseline", "baseline_tfidf"),
]
EXPERIMENT = "emoprompt-test"


def make_run_files(root: Path, model: str, strategy: str, seed: int) -> RunFiles:
    """Predictions, metadata, metrics and figure of one run, made by hand."""
    rng = np.random.default_rng(seed)
    gold = rng.choice(LABELS, 30).tolist()
    predicted = [g if rng.random() < 0.6 else str(rng.choice(LABELS)) for g in gold]
    frame = pd.DataFrame({"id": [str(i) for i in range(30)], "gold": gold,
                          "predicted": predicted, "parsed": True, "raw": ""})
    for column in score_columns():
        frame[column] = np.nan
    metadata = {"model": model, "strategy": strategy, "method": "generate", "revision": "main",
                "quantization": "none", "device": "cpu", "tweets": 30, "seconds": 2.0,
                "tweets_per_s": 15.0, "versions": {"python": "3.11"}}
    if strategy == "finetuned_first_token":
        metadata.update(template="Tweet: {tweet}\nEmoción:", prompt_sha256="b" * 64)
    elif strategy != "baseline_tfidf":
        metadata.update(messages=[{"role": "user", "content": "¿Qué emoción? {tweet}"}],
                        prompt_sha256="a" * 64)
    tsv = root / f"predictions/{model}/{strategy}.tsv"
    meta = root / f"predictions/{model}/{strategy}.json"
    write_result(Result(frame, metadata), str(tsv), str(meta))
    metrics_path = root / f"metrics/{model}/{strategy}.json"
    metrics = write_metrics(tsv, meta, metrics_path, model=model, strategy=strategy)
    figure = root / f"figures/confusion_{model}_{strategy}.png"
    write_confusion_figure(metrics["confusion"], figure)
    return RunFiles(model, strategy, tsv, meta, metrics_path, figure)


def active_runs(client: MlflowClient, experiment_id: str) -> list:
    return list(client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Three runs logged twice into a SQLite store (the second time with one run changed)."""
    root = tmp_path_factory.mktemp("tracking")
    results = root / "results"
    uri, artifacts = resolve_tracking_uri(results, environ={})
    runs = [make_run_files(results, m, s, i) for i, (m, s) in enumerate(PAIRS)]
    first = track_runs(runs, experiment=EXPERIMENT, tracking_uri=uri, sample=SAMPLE,
                       artifact_location=artifacts, workflow_dir=REPO)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    before = {r.info.run_id: r for r in active_runs(client, experiment_id)}
    # Re-predict one run (other predictions, same settings), then log everything again.
    changed = make_run_files(results, *PAIRS[0], seed=99)
    second = track_runs(runs, experiment=EXPERIMENT, tracking_uri=uri, sample=SAMPLE,
                        artifact_location=artifacts, workflow_dir=REPO)
    write_run_list(second, results / "mlflow_runs.tsv")
    return {"root": root, "results": results, "uri": uri, "runs": runs, "first": first,
            "second": second, "before": before, "changed": changed,
            "client": client, "experiment_id": experiment_id}


def test_store_and_artifacts_default_to_the_results_folder(tracked) -> None:
    results = tracked["results"]
    assert tracked["uri"] == f"sqlite:///{results.resolve()}/mlflow.db"
    assert (results / "mlflow.db").is_file()
    run = tracked["client"].get_run(tracked["second"][0].run_id)
    assert run.info.artifact_uri.startswith((results / "mlartifacts").resolve().as_uri())


def test_logging_twice_updates_the_same_runs(tracked) -> None:
    client, experiment_id = tracked["client"], tracked["experiment_id"]
    first, second = tracked["first"], tracked["second"]
    assert [t.action for t in first] == ["created"] * 3
    assert [t.action for t in second] == ["updated"] * 3
    assert [t.run_id for t in first] == [t.run_id for t in second]
    runs = active_runs(client, experiment_id)
    assert len(runs) == len(PAIRS) == len(tracked["before"])
    keys = sorted(r.data.tags[KEY_TAG] for r in runs)
    assert keys == sorted(run_key(m, s, SAMPLE) for m, s in PAIRS)
    assert keys[0] == "baseline/baseline_tfidf/sample=30,random,seed=0"
    listed = (tracked["results"] / "mlflow_runs.tsv").read_text().splitlines()
    assert listed[0].split("\t")[:4] == ["key", "model", "strategy", "run_id"]
    assert len(listed) == 4


def test_metrics_params_and_artifacts(tracked) -> None:
    client = tracked["client"]
    for files, run_info in zip(tracked["runs"], tracked["second"], strict=True):
        run = client.get_run(run_info.run_id)
        assert run.info.run_name == f"{files.model} · {files.strategy}"
        assert run.info.status == "FINISHED"
        expected = json.loads(files.metrics.read_text(encoding="utf-8"))
        assert run.data.metrics["f1_macro"] == pytest.approx(expected["f1_macro"])
        assert run.data.metrics["f1_Alegria"] == pytest.approx(
            expected["per_class"]["Alegría"]["f1"]
        )
        for name in ("accuracy", "f1_weighted", "unparsed_rate", "tweets", "tweets_per_s",
                     "precision_Otras", "recall_Sorpresa"):
            assert name in run.data.metrics
        params = run.data.params
        assert (params["model"], params["strategy"]) == (files.model, files.strategy)
        for name in ("revision", "quantization", "method", "shots", "shot_selection",
                     "sample_size", "sample_seed", "prompt_sha256", "git_commit"):
            assert name in params
        assert params["sample_size"] == "30"
        assert params["git_commit"] == git_commit(REPO)
        assert run.data.tags["mlflow.source.git.commit"] == params["git_commit"]
        paths = {a.path for folder in ("predictions", "metrics", "figures", "prompt")
                 for a in client.list_artifacts(run.info.run_id, folder)}
        assert f"predictions/{files.strategy}.tsv" in paths
        assert f"predictions/{files.strategy}.json" in paths
        assert f"metrics/{files.strategy}.json" in paths
        assert f"figures/confusion_{files.model}_{files.strategy}.png" in paths
        prompt = {"zero_shot_generate": "prompt/messages.json",
                  "finetuned_first_token": "prompt/template.txt"}.get(files.strategy)
        assert (prompt in paths) if prompt else not any(p.startswith("prompt/") for p in paths)


def test_relogging_replaces_metrics_and_artifacts(tracked) -> None:
    client, changed = tracked["client"], tracked["changed"]
    run_id = tracked["second"][0].run_id
    run = client.get_run(run_id)
    expected = json.loads(changed.metrics.read_text(encoding="utf-8"))
    assert run.data.metrics["accuracy"] == pytest.approx(expected["accuracy"])
    # The artefact holds the new predictions, not the first ones.
    local = client.download_artifacts(run_id, f"predictions/{changed.strategy}.tsv",
                                      str(tracked["root"] / "download"))
    assert Path(local).read_bytes() == changed.predictions.read_bytes()
    # Unchanged metrics were not logged again: one value in their history.
    assert len(client.get_metric_history(run_id, "tweets")) == 1


def test_changed_parameters_replace_the_run(tracked, tmp_path: Path) -> None:
    # The module's store (a new one costs seconds of schema set-up), another experiment.
    uri, artifacts = tracked["uri"], (tmp_path / "mlartifacts").as_uri()
    files = make_run_files(tmp_path, "smol", "zero_shot_generate", seed=1)
    (first,) = track_runs([files], experiment="e", tracking_uri=uri, sample=SAMPLE,
                          artifact_location=artifacts)
    metadata = json.loads(files.metadata.read_text(encoding="utf-8"))
    metadata["prompt_sha256"] = "c" * 64  # the prompt was edited and the run redone
    files.metadata.write_text(json.dumps(metadata), encoding="utf-8")
    (second,) = track_runs([files], experiment="e", tracking_uri=uri, sample=SAMPLE,
                           artifact_location=artifacts)
    assert second.action == "replaced" and second.run_id != first.run_id
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_experiment_by_name("e").experiment_id
    assert [r.info.run_id for r in active_runs(client, experiment_id)] == [second.run_id]
    old = client.get_run(first.run_id)
    assert old.info.lifecycle_stage == "deleted"
    assert old.data.tags[SUPERSEDED_TAG] == second.run_id
    assert client.get_run(second.run_id).data.params["prompt_sha256"] == "c" * 64


def test_tracking_uri_resolution(tmp_path: Path) -> None:
    uri, artifacts = resolve_tracking_uri(tmp_path, environ={})
    assert uri == default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert artifacts == (tmp_path.resolve() / "mlartifacts").as_uri()
    team = {"MLFLOW_TRACKING_URI": "http://mlflow.example:5000"}
    assert resolve_tracking_uri(tmp_path, environ=team) == ("http://mlflow.example:5000", None)
    assert git_commit(tmp_path) == "unknown"


# --- the same store through a real tracking server -------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@pytest.fixture
def server(tracked):
    """``mlflow server`` on 127.0.0.1 over the test store; always stopped (whole group)."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tracked["root"] / "server.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", tracked["uri"]],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited: {(tracked['root'] / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow server not ready within 60 s")
            time.sleep(0.25)
        yield base
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
        log.close()


def test_runs_are_browsable_through_a_server(tracked, server) -> None:
    name = urllib.parse.quote(EXPERIMENT)
    experiment = get_json(f"{server}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")
    experiment_id = experiment["experiment"]["experiment_id"]
    found = get_json(f"{server}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})
    runs = found["runs"]
    by_pair = {}
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        by_pair.setdefault((tags["emoprompt.model"], tags["emoprompt.strategy"]), []).append(run)
    assert sorted(by_pair) == sorted(PAIRS)
    assert all(len(v) == 1 for v in by_pair.values())  # one run per (model, strategy)
    for (model, strategy), (run,) in by_pair.items():
        metrics = {m["key"] for m in run["data"]["metrics"]}
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert {"f1_macro", "f1_Alegria", "accuracy", "unparsed_rate"} <= metrics
        assert (params["model"], params["strategy"]) == (model, strategy)
        run_id = run["info"]["run_id"]
        top = get_json(f"{server}/api/2.0/mlflow/artifacts/list?run_id={run_id}")
        assert {"figures", "metrics", "predictions"} <= {f["path"] for f in top["files"]}
        listed = get_json(
            f"{server}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=predictions"
        )
        assert f"predictions/{strategy}.tsv" in {f["path"] for f in listed["files"]}


@pytest.mark.parametrize("server", ["nothing listening", "a server that never answers"])
def test_a_tracking_store_that_does_not_answer_fails_fast_and_says_what_to_do(server):
    from emoprompt.tracking import TrackingUnavailable

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        if server == "a server that never answers":
            listener.listen(8)  # connections are accepted by the kernel, never answered
        else:
            listener.close()
        started = time.monotonic()
        with pytest.raises(TrackingUnavailable) as error:
            track_runs([], experiment="e", tracking_uri=f"http://127.0.0.1:{port}",
                       sample=SAMPLE, timeout=2, retries=0)
        waited = time.monotonic() - started
    message = str(error.value)
    assert f"127.0.0.1:{port}" in message and "--forcerun track" in message
    assert "results/predictions" in message and "mlflow_timeout" in message
    assert waited < 30, waited  # MLflow's own defaults wait minutes
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # set for the call only


def test_a_run_that_computed_differently_is_not_merged_into_the_first(tracked, tmp_path: Path):
    """Same model, strategy and sample, but other speed-ups (say, packed weights off for
    want of memory): the second run replaces the first instead of updating it."""
    uri, artifacts = tracked["uri"], (tmp_path / "mlartifacts").as_uri()
    files = make_run_files(tmp_path, "smol", "zero_shot_first_token", seed=3)
    backend = {"backend": "engine", "model_key": "llama/sdpa/cpu/float32"}
    metadata = json.loads(files.metadata.read_text(encoding="utf-8"))
    metadata["backend"] = {**backend, "speedups": ["prefix_reuse", "packed_weights"]}
    files.metadata.write_text(json.dumps(metadata), encoding="utf-8")
    (first,) = track_runs(
        [files], experiment="speedups", tracking_uri=uri, sample=SAMPLE, artifact_location=artifacts
    )
    params = MlflowClient(tracking_uri=uri).get_run(first.run_id).data.params
    assert params["speedups"] == "prefix_reuse,packed_weights"
    assert params["model_key"] == "llama/sdpa/cpu/float32"
    metadata["backend"] = {**backend, "speedups": ["prefix_reuse"]}
    files.metadata.write_text(json.dumps(metadata), encoding="utf-8")
    (second,) = track_runs(
        [files], experiment="speedups", tracking_uri=uri, sample=SAMPLE, artifact_location=artifacts
    )
    assert second.action == "replaced" and second.run_id != first.run_id


def test_a_validation_sample_is_a_run_of_its_own():
    test_key = run_key("smol", "zero_shot_generate", SAMPLE)
    assert test_key == "smol/zero_shot_generate/sample=30,random,seed=0"  # as before
    assert run_key("smol", "zero_shot_generate", {**SAMPLE, "split": "test"}) == test_key
    validation = run_key("smol", "zero_shot_generate", {**SAMPLE, "split": "validation"})
    assert validation == "smol/zero_shot_generate/sample=validation:30,random,seed=0"


def test_a_copied_results_folder_tracks_into_itself_not_the_original(tracked, tmp_path) -> None:
    original = tracked["results"]
    before = sorted(p.relative_to(original) for p in (original / "mlartifacts").rglob("*"))
    copy = tmp_path / "elsewhere" / "results"
    copy.parent.mkdir()
    subprocess.run(["cp", "-a", str(original), str(copy)], check=True)
    uri, artifacts = resolve_tracking_uri(copy, environ={})
    runs = [make_run_files(copy, m, s, 50 + i) for i, (m, s) in enumerate(PAIRS)]  # new files
    tracked_again = track_runs(runs, experiment=EXPERIMENT, tracking_uri=uri, sample=SAMPLE,
                               artifact_location=artifacts, workflow_dir=REPO)  # fmt: skip
    assert {t.action for t in tracked_again} == {"updated"}
    after = sorted(p.relative_to(original) for p in (original / "mlartifacts").rglob("*"))
    assert after == before  # nothing written into the original folder
    client = MlflowClient(tracking_uri=uri)
    for run in tracked_again:
        artifact_uri = client.get_run(run.run_id).info.artifact_uri
        assert artifact_uri.startswith(copy.resolve().as_uri()), artifact_uri
        assert client.list_artifacts(run.run_id, "predictions")  # found in the copy


def make_family_files(root: Path) -> RunFiles:
    """A prompt family of three variants (two prompt texts, one of them calibrated too)."""
    from emoprompt.tracking import FamilyFiles

    files = make_run_files(root, "smol", "zero_shot_first_token", seed=5)
    meta = json.loads(files.metadata.read_text())
    prompts = {"v000": "¿Qué emoción? {tweet}", "v001": "¿Qué emoción? {tweet}",
               "v002": "Emoción del tuit: {tweet}"}  # fmt: skip
    variants = []
    for i, (variant, text) in enumerate(prompts.items()):
        run = {"prompt_family": "zero_shot", "prompt_sha256": text.encode().hex()[:64],
               "messages": [{"role": "user", "content": text}]}  # fmt: skip
        values = {"instruction": "base" if i < 2 else "otra",
                  "calibration": "batch" if i == 1 else "none"}  # fmt: skip
        variants.append({"id": variant, "index": i, "label": variant, "values": values, "run": run})
    meta.update(prompt_family="zero_shot", prompt_sha256=variants[0]["run"]["prompt_sha256"])
    files.metadata.write_text(json.dumps(meta))
    family = root / "variants"
    family.mkdir()
    record = {"model": "smol", "strategy": "zero_shot_first_token", "variants": variants}
    (family / "variants.json").write_text(json.dumps(record))
    (family / "choice.json").write_text(json.dumps({"chosen": "v002"}))
    for split, n in (("validation", 8), ("test", 30)):
        rows = [{"variant": v, "id": str(i), "gold": LABELS[i % 7],
                 "predicted": LABELS[(i + k) % 7], "parsed": True, "raw": "", "truncated": False}
                for k, v in enumerate(prompts) for i in range(n)]  # fmt: skip
        pd.DataFrame(rows).to_csv(family / f"{split}.tsv", sep="\t", index=False)
    names = ("variants.json", "validation.tsv", "test.tsv", "choice.json")
    paths = [family / name for name in names]
    return RunFiles(*[getattr(files, f) for f in ("model", "strategy", "predictions", "metadata",
                                                  "metrics", "figure")], None,
                    FamilyFiles(*paths))  # fmt: skip


def test_a_family_is_a_parent_run_with_a_child_per_variant_logged_once(tmp_path: Path) -> None:
    results = tmp_path / "results"
    uri, artifacts = resolve_tracking_uri(results, environ={})
    run = make_family_files(results)
    data = tmp_path / "data"
    data.mkdir()
    splits = {}
    for context, n in (("evaluation", 30), ("training", 50), ("validation", 8)):
        frame = pd.DataFrame({"id": [f"{context}{i}" for i in range(n)], "event": "X",
                              "tweet": [f"tuit {i}" for i in range(n)], "offensive": "NO",
                              "label": [LABELS[i % 7] for i in range(n)]})  # fmt: skip
        splits[context] = data / f"{context}.tsv"
        frame.to_csv(splits[context], sep="\t", index=False)

    def track():
        return track_runs([run], experiment=EXPERIMENT, tracking_uri=uri, sample=SAMPLE,
                          artifact_location=artifacts, datasets=splits)  # fmt: skip

    first = track()
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id

    def state():
        runs = active_runs(client, experiment_id)
        versions = client.search_prompt_versions("emoprompt-zero_shot-chat")
        inputs = {r.info.run_id: sorted(t.value for i in r.inputs.dataset_inputs for t in i.tags)
                  for r in runs}  # fmt: skip
        return runs, versions, inputs

    runs, versions, inputs = state()
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 4 and len(children) == 3 and len(first) == 4
    by_variant = {r.data.params["variant"]: r for r in children}
    assert by_variant["v001"].data.params["variant_calibration"] == "batch"
    assert by_variant["v002"].data.params["variant_instruction"] == "otra"
    assert by_variant["v002"].data.metrics["chosen_on_validation"] == 1.0
    assert by_variant["v000"].data.metrics["chosen_on_validation"] == 0.0
    assert by_variant["v000"].data.metrics["accuracy"] == pytest.approx(1.0)
    assert by_variant["v001"].data.metrics["validation_accuracy"] == pytest.approx(0.0)
    # one registry version per distinct prompt text, each linked to the runs that asked it
    assert len(versions) == 2
    assert {v.template[0]["content"] for v in versions} == {
        "¿Qué emoción? {{tweet}}", "Emoción del tuit: {{tweet}}"}  # fmt: skip
    linked = {r.data.params.get("variant", "parent"): r.data.tags["mlflow.linkedPrompts"]
              for r in runs}  # fmt: skip
    assert linked["v000"] == linked["v001"] == linked["parent"] != linked["v002"]
    # the data as inputs, by context: the parent's evaluation and validation samples
    # (zero-shot: no train split), each child's too
    assert inputs[parent.info.run_id] == ["evaluation", "validation"]
    assert all(inputs[r.info.run_id] == ["evaluation", "validation"] for r in children)
    import hashlib

    digests = {i.dataset.digest for i in parent.inputs.dataset_inputs}
    files = {hashlib.sha256(splits[c].read_bytes()).hexdigest()[:32]
             for c in ("evaluation", "validation")}  # fmt: skip
    assert digests == files and all(len(r.inputs.dataset_inputs) == 2 for r in runs)

    # the store is this call's alone: no later process inherits it
    assert "MLFLOW_TRACKING_URI" not in os.environ
    second = track()  # tracking again adds no run, no version, no input
    assert [t.action for t in second] == ["updated"] * 4
    again = state()
    assert sorted(r.info.run_id for r in again[0]) == sorted(r.info.run_id for r in runs)
    assert len(again[1]) == 2 and again[2] == inputs
