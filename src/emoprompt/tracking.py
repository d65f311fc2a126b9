"""MLflow tracking of the study: one run per (model, strategy), logged by the aggregation step.

This is the only module of the project that imports mlflow. Prediction jobs never log
to MLflow; the workflow's single ``track`` job calls :func:`track_runs`, which is
idempotent: every run carries a deterministic key (tag ``emoprompt.key``:
``{model}/{strategy}/sample={size},{scheme},seed={seed}``, with ``,fewshot_seed={seed}``
for a study grid's few-shot runs), is looked up by it before anything is created, and
is updated in place. Artefacts are logged under fixed names, so a second logging
replaces them; metrics are logged only when their value changed.
MLflow parameters cannot change once logged: when a parameter differs (another prompt,
device, git commit...) the old run is tagged as superseded and soft-deleted, and a
fresh run takes the key, so the experiment still holds one run per key.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (a team server, with no code change),
else a SQLite database in the results folder (``results/mlflow.db``) with artefacts in
``results/mlartifacts``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.tracking import MlflowClient

from emoprompt.evaluation.metrics import flat_metrics, read_metadata
from emoprompt.infra.files import atomic_open, sha256_file
from emoprompt.models.adapter import (
    adapter_files,
    read_loss_history,
    read_training_config,
    weights_path,
)

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
KEY_TAG = "emoprompt.key"
SUPERSEDED_TAG = "emoprompt.superseded_by"
RUN_LIST_COLUMNS = ("key", "model", "strategy", "run_id", "experiment_id", "action")


@dataclass(frozen=True)
class RunFiles:
    """The files of one (model, strategy) run that go to MLflow."""

    model: str
    strategy: str
    predictions: Path  # the predictions TSV
    metadata: Path  # the prediction job's metadata JSON
    metrics: Path  # the metrics JSON
    figure: Path  # the confusion matrix PNG
    # A study grid's run: its own sample seed (and few-shot seed), over the shared settings.
    sample: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class TrackedRun:
    key: str
    model: str
    strategy: str
    run_id: str
    experiment_id: str
    action: str  # created | updated | replaced


def default_tracking_uri(results_dir: str | os.PathLike[str]) -> str:
    """``sqlite:////abs/path/results/mlflow.db``."""
    return f"sqlite:///{(Path(results_dir).resolve() / 'mlflow.db').as_posix()}"


def default_artifact_location(results_dir: str | os.PathLike[str]) -> str:
    """``file:///abs/path/results/mlartifacts``."""
    return (Path(results_dir).resolve() / "mlartifacts").as_uri()


def resolve_tracking_uri(
    results_dir: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> tuple[str, str | None]:
    """The tracking URI, and where a new experiment keeps its artefacts.

    ``MLFLOW_TRACKING_URI`` wins (the server or store decides where artefacts go: None);
    otherwise the results folder's SQLite database and ``mlartifacts`` folder.
    """
    environ = os.environ if environ is None else environ
    uri = environ.get(TRACKING_URI_ENV, "").strip()
    if uri:
        return uri, None
    return default_tracking_uri(results_dir), default_artifact_location(results_dir)


def redact_uri(uri: str) -> str:
    """The URI without any user:password part, for logs."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def sample_label(sample: Mapping[str, Any]) -> str:
    """The evaluation sample's settings in a key: ``sample=100,random,seed=0``; a grid's
    few-shot run adds its few-shot seed: ``sample=100,random,seed=0,fewshot_seed=1``."""
    label = f"sample={sample['size']},{sample['scheme']},seed={sample['seed']}"
    if sample.get("fewshot_seed") is not None:
        label += f",fewshot_seed={sample['fewshot_seed']}"
    return label


def run_key(model: str, strategy: str, sample: Mapping[str, Any]) -> str:
    """The deterministic identity of a run: ``{model}/{strategy}/{sample settings}``."""
    return f"{model}/{strategy}/{sample_label(sample)}"


def git_commit(folder: str | os.PathLike[str]) -> str:
    """``git rev-parse HEAD`` of the checkout holding ``folder``; "unknown" if there is none."""
    try:
        result = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else "unknown"


def _text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def run_params(
    model: str,
    strategy: str,
    metadata: Mapping[str, Any],
    sample: Mapping[str, Any],
    commit: str,
) -> dict[str, str]:
    """What defines a run, as MLflow parameters (strings)."""
    shots = metadata.get("few_shot") or {}
    decoding = metadata.get("decoding") or {}
    scoring = metadata.get("scoring") or {}
    params: dict[str, Any] = {
        "model": model,
        "model_source": metadata.get("source"),
        "revision": metadata.get("revision"),
        "dtype": metadata.get("dtype"),
        "quantization": metadata.get("quantization", "none"),
        "device": metadata.get("device"),
        "strategy": strategy,
        "method": metadata.get("method"),
        "prompt_family": metadata.get("prompt_family"),
        "prompt_file": metadata.get("prompt_file"),
        "prompt_sha256": metadata.get("prompt_sha256"),
        "shots": shots.get("n", 0),
        "shot_selection": shots.get("method"),
        "shot_seed": shots.get("seed"),
        "sample_size": sample["size"],
        "sample_scheme": sample["scheme"],
        "sample_seed": sample["seed"],
        "fallback_label": metadata.get("fallback_label"),
        "batch_size": metadata.get("batch_size"),
        "git_commit": commit,
    }
    for name, value in decoding.items():
        params[f"decoding_{name}"] = value
    for name, value in scoring.items():
        params[f"scoring_{name}"] = value
    if "seed" in metadata:  # the baseline's own seed
        params["baseline_seed"] = metadata["seed"]
    if (metadata.get("adapter") or {}).get("fingerprint"):  # a retrained adapter: a new run
        params["adapter_fingerprint"] = metadata["adapter"]["fingerprint"]
    return {name: _text(value) for name, value in params.items()}


def run_tags(
    model: str, strategy: str, key: str, metadata: Mapping[str, Any], commit: str
) -> dict[str, str]:
    tags = {
        KEY_TAG: key,
        "emoprompt.model": model,
        "emoprompt.strategy": strategy,
        "mlflow.source.git.commit": commit,
    }
    for name, value in (metadata.get("versions") or {}).items():
        tags[f"version.{name}"] = str(value)
    return tags


def prompt_artifact(metadata: Mapping[str, Any]) -> tuple[str, str] | None:
    """The prompt that was asked, as (artefact file name, text); None for the baseline."""
    if metadata.get("messages") is not None:
        text = json.dumps(metadata["messages"], indent=2, ensure_ascii=False) + "\n"
        return "messages.json", text
    if metadata.get("template") is not None:
        return "template.txt", str(metadata["template"])
    return None


def get_experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment's id, creating it (or restoring it from the bin) when needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        log.info("creating MLflow experiment %r", name)
        return client.create_experiment(name, artifact_location=artifact_location)
    if experiment.lifecycle_stage == "deleted":
        log.info("restoring deleted MLflow experiment %r", name)
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def find_runs(client: MlflowClient, experiment_id: str, key: str) -> list:
    """Active runs carrying ``key``, newest first."""
    escaped = key.replace("\\", "\\\\").replace("'", "\\'")
    return list(
        client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{KEY_TAG}` = '{escaped}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time DESC"],
        )
    )


def _params_conflict(existing: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    changed = [name for name, value in new.items() if existing.get(name, value) != value]
    return changed + sorted(set(existing) - set(new))


def _changed_metrics(existing: Mapping[str, float], new: Mapping[str, float]) -> dict:
    return {
        name: value
        for name, value in new.items()
        if name not in existing
        or not math.isclose(existing[name], value, rel_tol=1e-12, abs_tol=0.0)
    }


def upsert_run(
    client: MlflowClient,
    experiment_id: str,
    key: str,
    params: Mapping[str, str],
    tags: Mapping[str, str],
    name: str,
) -> tuple[str, str, Mapping[str, str], Mapping[str, float]]:
    """The one run of ``key``: (run id, action, its params, its metrics).

    Duplicates (left by an interrupted or concurrent logging) are removed, the newest
    kept. A run whose parameters conflict with ``params`` is replaced by a new one that
    it points to (``SUPERSEDED_TAG``) and deleted; action is ``created``, ``replaced``
    or ``updated`` (the existing run is kept, with what it has logged already).
    """
    found = find_runs(client, experiment_id, key)
    for extra in found[1:]:
        log.warning("%s: removing duplicate run %s", key, extra.info.run_id)
        client.delete_run(extra.info.run_id)
    run = found[0] if found else None
    if run is not None:
        changed = _params_conflict(run.data.params, params)
        if not changed:
            client.update_run(run.info.run_id, name=name)
            return run.info.run_id, "updated", run.data.params, run.data.metrics
        log.info(
            "%s: parameters changed (%s): replacing run %s",
            key,
            ", ".join(changed),
            run.info.run_id,
        )
    new = client.create_run(experiment_id, tags=dict(tags), run_name=name)
    if run is None:
        return new.info.run_id, "created", {}, {}
    client.set_tag(run.info.run_id, SUPERSEDED_TAG, new.info.run_id)
    client.delete_run(run.info.run_id)
    return new.info.run_id, "replaced", {}, {}


def track_run(
    client: MlflowClient,
    experiment_id: str,
    files: RunFiles,
    sample: Mapping[str, Any],
    commit: str,
    extra_tags: Mapping[str, str] | None = None,
) -> TrackedRun:
    """Create or update the run of one (model, strategy); see the module's docstring."""
    sample = {**sample, **(files.sample or {})}
    metadata = read_metadata(files.metadata)
    metrics = flat_metrics(read_metadata(files.metrics))
    key = run_key(files.model, files.strategy, sample)
    params = run_params(files.model, files.strategy, metadata, sample, commit)
    tags = {**run_tags(files.model, files.strategy, key, metadata, commit), **(extra_tags or {})}
    name = f"{files.model} · {files.strategy}"

    run_id, action, existing_params, existing_metrics = upsert_run(
        client, experiment_id, key, params, tags, name
    )
    try:
        now = int(time.time() * 1000)
        new_params = [Param(k, v) for k, v in params.items() if k not in existing_params]
        new_metrics = [
            Metric(k, v, now, 0) for k, v in _changed_metrics(existing_metrics, metrics).items()
        ]
        new_tags = [RunTag(k, v) for k, v in tags.items()]
        client.log_batch(run_id, metrics=new_metrics, params=new_params, tags=new_tags)
        # Fixed artefact paths: logging again overwrites the previous files.
        client.log_artifact(run_id, str(files.predictions), "predictions")
        client.log_artifact(run_id, str(files.metadata), "predictions")
        client.log_artifact(run_id, str(files.metrics), "metrics")
        client.log_artifact(run_id, str(files.figure), "figures")
        prompt = prompt_artifact(metadata)
        if prompt is not None:
            client.log_text(run_id, prompt[1], f"prompt/{prompt[0]}")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    log.info("%s: %s run %s (%d new metric values)", key, action, run_id, len(new_metrics))
    return TrackedRun(key, files.model, files.strategy, run_id, experiment_id, action)


def track_runs(
    runs: Sequence[RunFiles],
    *,
    experiment: str,
    tracking_uri: str,
    sample: Mapping[str, Any],
    artifact_location: str | None = None,
    workflow_dir: str | os.PathLike[str] | None = None,
    trainings: Mapping[str, str | os.PathLike[str]] | None = None,
) -> list[TrackedRun]:
    """Log every (model, strategy) run to MLflow; safe to call again (see module docstring).

    ``sample``: the evaluation sample's ``size``, ``scheme`` and ``seed``.
    ``artifact_location``: where a newly created experiment keeps its artefacts.
    ``workflow_dir``: a folder of the workflow, for the git commit ("unknown" if None).
    ``trainings``: fine-tuned model -> its adapter folder; each training gets a run of
    its own, and the evaluation runs of that model are tagged with its run id.
    """
    commit = git_commit(workflow_dir) if workflow_dir is not None else "unknown"
    client = MlflowClient(tracking_uri=tracking_uri)
    log.info("MLflow tracking URI %s, experiment %r", redact_uri(tracking_uri), experiment)
    experiment_id = get_experiment_id(client, experiment, artifact_location)
    trained = [
        track_training(client, experiment_id, model, Path(folder), commit)
        for model, folder in (trainings or {}).items()
    ]
    training_of = {run.model: run.run_id for run in trained}
    return trained + [
        track_run(
            client,
            experiment_id,
            files,
            sample,
            commit,
            {TRAINING_RUN_TAG: training_of[files.model]} if files.model in training_of else None,
        )
        for files in runs
    ]


# --- fine-tuning runs: one per trained adapter, linked from its evaluation runs ---
TRAINING_RUN_TAG = "emoprompt.training_run_id"
TRAINING_STRATEGY = "finetune"


def training_params(
    model: str, record: Mapping[str, Any], adapter_sha256: str, commit: str
) -> dict[str, str]:
    """What defines a training run, as MLflow parameters (strings)."""
    params: dict[str, Any] = {
        "model": model,
        "base_model": record.get("base_model"),
        "base_location": record.get("base_location"),
        "prompt_format": record.get("prompt_format"),
        "labels": ",".join(record.get("labels") or []),
        "train_file": record.get("train_file"),
        "train_tweets": record.get("train_tweets"),
        "train_ids_sha256": record.get("train_ids_sha256"),
        "device": record.get("device"),
        "quantization": record.get("quantization"),
        "trainable_parameters": record.get("trainable_parameters"),
        "adapter_sha256": adapter_sha256,
        "git_commit": commit,
    }
    for name, value in (record.get("settings") or {}).items():
        if name not in ("checkpoint_minutes", "checkpoint_steps", "threads"):
            params[f"ft_{name}"] = value
    return {name: _text(value)[:6000] for name, value in params.items()}


def track_training(
    client: MlflowClient, experiment_id: str, model: str, adapter: Path, commit: str
) -> TrackedRun:
    """Create (or find) the run of one fine-tuning: its settings as parameters, the loss
    per step as the metric history ``train_loss``, and the adapter folder as artefacts.
    A retrained adapter (another sha256) replaces the run, as changed parameters do."""
    record = read_training_config(adapter)
    key = f"{model}/{TRAINING_STRATEGY}"
    params = training_params(model, record, sha256_file(weights_path(adapter)), commit)
    tags = {
        KEY_TAG: key,
        "emoprompt.model": model,
        "emoprompt.strategy": TRAINING_STRATEGY,
        "mlflow.source.git.commit": commit,
    }
    tags.update({f"version.{k}": str(v) for k, v in (record.get("versions") or {}).items()})
    run_id, action, _, _ = upsert_run(
        client, experiment_id, key, params, tags, f"{model} · fine-tuning"
    )
    if action == "updated":
        log.info("%s: training run %s is up to date", key, run_id)
        return TrackedRun(key, model, TRAINING_STRATEGY, run_id, experiment_id, action)
    try:
        now = int(time.time() * 1000)
        history = []
        for row in read_loss_history(adapter):
            history.append(Metric("train_loss", row["loss"], now, row["step"]))
            history.append(Metric("learning_rate", row["lr"], now, row["step"]))
        summary = {
            "final_loss": record.get("final_loss"),
            "train_seconds": record.get("seconds"),
            "steps": record.get("steps"),
            "train_tweets": record.get("train_tweets"),
        }
        history += [Metric(k, float(v), now, 0) for k, v in summary.items() if v is not None]
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()], tags=[])
        for start in range(0, len(history), 900):  # MLflow takes at most 1000 per batch
            client.log_batch(run_id, metrics=history[start : start + 900])
        for path in adapter_files(adapter):
            client.log_artifact(run_id, str(path), "adapter")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    log.info("%s: %s training run %s", key, action, run_id)
    return TrackedRun(key, model, TRAINING_STRATEGY, run_id, experiment_id, action)


# --- end of fine-tuning runs ---


def write_run_list(tracked: Sequence[TrackedRun], path: str | os.PathLike[str]) -> None:
    """The runs logged: key, model, strategy, run id, experiment id, action (TSV)."""
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(RUN_LIST_COLUMNS)
        for run in tracked:
            writer.writerow([getattr(run, column) for column in RUN_LIST_COLUMNS])
