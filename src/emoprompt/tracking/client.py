"""MLflow itself: the only module of the project that imports it.

One run per (model, strategy), and one per trained adapter, created or updated through
one upsert (:func:`upsert_run`): see :mod:`emoprompt.tracking` for what that guarantees.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from emoprompt.data.splits import read_split
from emoprompt.evaluation.metrics import flat_metrics, read_metadata
from emoprompt.evaluation.predictions import read_predictions
from emoprompt.evaluation.selection import variant_scores
from emoprompt.infra.environment import temporary_environ
from emoprompt.infra.files import sha256_file
from emoprompt.infra.provenance import git_commit
from emoprompt.models.adapter import (
    adapter_files,
    read_loss_history,
    read_training_config,
    weights_path,
)
from emoprompt.tracking.records import (
    KEY_TAG,
    SUPERSEDED_TAG,
    TRACKING_URI_ENV,
    TRAINING_RUN_TAG,
    TRAINING_STRATEGY,
    RunFiles,
    TrackedRun,
    prompt_artifact,
    redact_uri,
    registry_prompt,
    run_inputs,
    run_key,
    run_params,
    run_tags,
    training_params,
    variant_params,
)
from emoprompt.tracking.store import follow_moved_folder

log = logging.getLogger(__name__)


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
    datasets: Datasets | None = None,
) -> list[TrackedRun]:
    """Create or update the run of one (model, strategy), and a prompt family's child
    runs, one per variant; see the module's docstring."""
    datasets = datasets or Datasets()
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
        link_prompt(client, run_id, metadata)
        contexts = run_inputs(
            metadata.get("prompt_family"), metadata.get("method"), bool(files.family)
        )
        datasets.log(client, run_id, contexts)
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    log.info("%s: %s run %s (%d new metric values)", key, action, run_id, len(new_metrics))
    parent = TrackedRun(key, files.model, files.strategy, run_id, experiment_id, action)
    if files.family is None:
        return [parent]
    return [parent, *track_variants(client, parent, params, files, datasets)]


def track_variants(
    client: MlflowClient,
    parent: TrackedRun,
    parent_params: Mapping[str, str],
    files: RunFiles,
    datasets: Datasets,
) -> list[TrackedRun]:
    """One child run per variant of a prompt family (its axis values as parameters, its
    validation and test scores as metrics, its prompt linked from the registry)."""
    family = files.family
    record, choice = read_metadata(family.record), read_metadata(family.choice)
    scores = {
        split: variant_scores(read_predictions(str(path))).set_index("variant")
        for split, path in (("validation", family.validation), ("test", family.test))
    }
    tracked = []
    for variant in record["variants"]:
        key = f"{parent.key}/{variant['id']}"
        run = variant["run"]
        params = variant_params(parent_params, variant, run)
        tags = {
            KEY_TAG: key,
            "mlflow.parentRunId": parent.run_id,
            "emoprompt.model": parent.model,
            "emoprompt.strategy": parent.strategy,
            "emoprompt.variant": variant["id"],
        }
        name = f"{parent.model} · {parent.strategy} · {variant['label']}"
        run_id, action, existing_params, existing_metrics = upsert_run(
            client, parent.experiment_id, key, params, tags, name
        )
        metrics = {"chosen_on_validation": float(variant["id"] == choice["chosen"])}
        for split, table in scores.items():
            prefix = "" if split == "test" else "validation_"
            metrics[f"{prefix}f1_macro"] = float(table.at[variant["id"], "f1_macro"])
            metrics[f"{prefix}accuracy"] = float(table.at[variant["id"], "accuracy"])
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[
                Metric(k, v, now, 0) for k, v in _changed_metrics(existing_metrics, metrics).items()
            ],
            params=[Param(k, v) for k, v in params.items() if k not in existing_params],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        link_prompt(client, run_id, run)
        datasets.log(client, run_id, ["evaluation", "validation"])
        client.set_terminated(run_id, "FINISHED")
        tracked.append(
            TrackedRun(key, parent.model, parent.strategy, run_id, parent.experiment_id, action)
        )
    log.info("%s: %d variant runs", parent.key, len(tracked))
    return tracked


PROMPT_DIGEST_TAG = "emoprompt.prompt_sha256"


def prompt_version(client: MlflowClient, name: str, template: Any, digest: str):
    """The registry's version of this prompt text: found by its digest, else registered
    (one version per distinct text, however often it is tracked)."""
    try:
        versions = client.search_prompt_versions(name, max_results=1000)
    except MlflowException:  # no such prompt yet
        versions = []
    for version in versions or []:
        if (version.tags or {}).get(PROMPT_DIGEST_TAG) == digest:
            return version
    return client.register_prompt(
        name, template, commit_message=f"sha256 {digest[:12]}", tags={PROMPT_DIGEST_TAG: digest}
    )


def link_prompt(client: MlflowClient, run_id: str, metadata: Mapping[str, Any]) -> None:
    """The run's prompt, in the Prompt Registry, linked to the run."""
    prompt = registry_prompt(metadata)
    if prompt is not None:
        client.link_prompt_version_to_run(run_id, prompt_version(client, *prompt))


class Datasets:
    """The study's data files as MLflow datasets (read once), logged as run inputs."""

    def __init__(self, files: Mapping[str, str | os.PathLike[str]] | None = None):
        self.files = {k: Path(v) for k, v in (files or {}).items()}
        self._entities: dict[str, Any] = {}

    def entity(self, context: str):
        if context not in self._entities:
            path = self.files[context]
            frame = read_split(path)
            targets = "label" if "label" in frame.columns else None
            # the digest is the file's sha256 (as the prediction records give it), cut to
            # the length MLflow stores
            digest = sha256_file(path)[:32]
            data = mlflow.data.from_pandas(
                frame, source=str(path), name=path.stem, targets=targets, digest=digest
            )
            self._entities[context] = data._to_mlflow_entity()
        return self._entities[context]

    def log(self, client: MlflowClient, run_id: str, contexts: Sequence[str]) -> None:
        """Log the run's inputs of ``contexts`` that it does not hold already."""
        held = {
            (item.dataset.digest, tag.value)
            for item in client.get_run(run_id).inputs.dataset_inputs
            for tag in item.tags
            if tag.key == "mlflow.data.context"
        }
        new = [
            DatasetInput(self.entity(c), [InputTag("mlflow.data.context", c)])
            for c in contexts
            if c in self.files and (self.entity(c).digest, c) not in held
        ]
        if new:
            client.log_inputs(run_id, datasets=new)


def track_runs(
    runs: Sequence[RunFiles],
    *,
    experiment: str,
    tracking_uri: str,
    sample: Mapping[str, Any],
    artifact_location: str | None = None,
    workflow_dir: str | os.PathLike[str] | None = None,
    trainings: Mapping[str, str | os.PathLike[str]] | None = None,
    timeout: float = 10,
    retries: int = 1,
    datasets: Mapping[str, str | os.PathLike[str]] | None = None,
) -> list[TrackedRun]:
    """Log every (model, strategy) run to MLflow; safe to call again (see module docstring).

    A tracking server gets ``timeout`` seconds per request and ``retries`` more tries; one
    that does not answer raises :class:`TrackingUnavailable`, which says how to log the
    runs later (the predictions and metrics are untouched).

    ``sample``: the evaluation sample's ``size``, ``scheme`` and ``seed``.
    ``artifact_location``: where a newly created experiment keeps its artefacts.
    ``workflow_dir``: a folder of the workflow, for the git commit ("unknown" if None).
    ``trainings``: fine-tuned model -> its adapter folder; each training gets a run of
    its own, and the evaluation runs of that model are tagged with its run id.
    ``datasets``: context (evaluation, training, validation) -> its data file, logged as
    the runs' inputs.
    """
    commit = git_commit(workflow_dir) if workflow_dir is not None else "unknown"
    if artifact_location is not None:  # the default store: it follows a moved folder
        follow_moved_folder(tracking_uri, artifact_location)
    with request_limits(timeout, retries), default_store(tracking_uri):
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        log.info("MLflow tracking URI %s, experiment %r", redact_uri(tracking_uri), experiment)
        try:
            experiment_id = get_experiment_id(client, experiment, artifact_location)
        except (MlflowException, OSError) as exc:
            raise TrackingUnavailable(_unavailable(tracking_uri, timeout, retries, exc)) from None
        return _track_all(
            client, experiment_id, runs, sample, commit, trainings, Datasets(datasets)
        )


@contextlib.contextmanager
def default_store(uri: str) -> Iterator[None]:
    """MLflow's default store set to ``uri`` for a block (the registry links a prompt to
    a run through it), then unset, and ``MLFLOW_TRACKING_URI`` put back as it was: MLflow
    exports the default to the environment, where later child processes (other
    workflows) would inherit it."""
    before = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if before is not None:
            os.environ[TRACKING_URI_ENV] = before


class TrackingUnavailable(RuntimeError):
    """The tracking store did not answer; nothing was logged."""


def _unavailable(uri: str, timeout: float, retries: int, exc: Exception) -> str:
    first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return (
        f"the MLflow tracking store {redact_uri(uri)} did not answer ({timeout:g} s per "
        f"request, {retries} more tries; mlflow_timeout and mlflow_retries in config.yaml): "
        f"{first}. Nothing is lost: the predictions and metrics are in results/predictions "
        "and results/metrics. Once the store answers, log them alone with "
        "`snakemake --cores 1 --forcerun track` (or unset MLFLOW_TRACKING_URI to use "
        "results/mlflow.db)."
    )


@contextlib.contextmanager
def request_limits(timeout: float, retries: int) -> Iterator[None]:
    """MLflow's HTTP timeout and retries for the duration of a block (its defaults are
    two minutes and seven retries with backoff: a store that is down took minutes)."""
    with temporary_environ(
        MLFLOW_HTTP_REQUEST_TIMEOUT=str(max(1, math.ceil(timeout))),
        MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(int(retries)),
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
    ):
        yield


def _track_all(client, experiment_id, runs, sample, commit, trainings, datasets):
    trained = [
        track_training(client, experiment_id, model, Path(folder), commit)
        for model, folder in (trainings or {}).items()
    ]
    training_of = {run.model: run.run_id for run in trained}
    tracked = list(trained)
    for files in runs:
        extra = {TRAINING_RUN_TAG: training_of[files.model]} if files.model in training_of else None
        tracked += track_run(client, experiment_id, files, sample, commit, extra, datasets)
    return tracked


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
        validation = record.get("validation") or {}
        for name in ("f1_macro", "accuracy"):  # the adapter's score on the validation split
            if name in validation:
                summary[f"validation_{name}"] = validation[name]["value"]
                summary[f"validation_{name}_ci_low"] = validation[name]["low"]
                summary[f"validation_{name}_ci_high"] = validation[name]["high"]
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
