"""What a tracked run is, in plain data: its key, parameters, tags and files.

No MLflow here (:mod:`emoprompt.tracking.client` talks to it): the run key that makes
logging idempotent, the parameters and tags of evaluation and training runs, where the
store is, and the list of logged runs the track rule writes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from emoprompt.infra.files import atomic_open

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
    # A prompt family's run: its variants become the run's child runs.
    family: FamilyFiles | None = None


@dataclass(frozen=True)
class FamilyFiles:
    """A prompt family's files: the variants' record, their predictions, the choice."""

    record: Path
    validation: Path
    test: Path
    choice: Path


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
    few-shot run adds its few-shot seed: ``sample=100,random,seed=0,fewshot_seed=1``; a
    sample of the validation split says so: ``sample=validation:100,random,seed=0``."""
    split = sample.get("split", "test")
    where = "" if split == "test" else f"{split}:"
    label = f"sample={where}{sample['size']},{sample['scheme']},seed={sample['seed']}"
    if sample.get("fewshot_seed") is not None:
        label += f",fewshot_seed={sample['fewshot_seed']}"
    return label


def run_key(model: str, strategy: str, sample: Mapping[str, Any]) -> str:
    """The deterministic identity of a run: ``{model}/{strategy}/{sample settings}``."""
    return f"{model}/{strategy}/{sample_label(sample)}"


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
        "sample_split": sample.get("split", "test"),
        "fallback_label": metadata.get("fallback_label"),
        "batch_size": metadata.get("batch_size"),
        "git_commit": commit,
    }
    backend = metadata.get("backend") or {}
    if backend:  # how the numbers were computed: runs that computed differently differ
        params["backend"] = backend.get("backend")
        params["model_key"] = backend.get("model_key")
        params["speedups"] = ",".join(backend.get("speedups") or []) or "none"
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
    for key in ("template", "text"):
        if metadata.get(key) is not None:
            return f"{key}.txt", str(metadata[key])
    return None


def registry_prompt(metadata: Mapping[str, Any]) -> tuple[str, Any, str] | None:
    """A run's prompt for MLflow's Prompt Registry: (prompt name, template, sha256), the
    tweet as the template variable ``{{tweet}}``; None for runs without a prompt."""
    family, digest = metadata.get("prompt_family"), metadata.get("prompt_sha256")
    if not family or not digest:
        return None
    if metadata.get("messages") is not None:
        template = [
            {"role": m["role"], "content": m["content"].replace("{tweet}", "{{tweet}}")}
            for m in metadata["messages"]
        ]
        return f"emoprompt-{family}-chat", template, digest
    for key, kind in (("template", "plain"), ("text", "text")):
        if metadata.get(key) is not None:
            return (
                f"emoprompt-{family}-{kind}",
                metadata[key].replace("{tweet}", "{{tweet}}"),
                digest,
            )
    return None


def variant_params(
    parent: Mapping[str, str], variant: Mapping[str, Any], run: Mapping[str, Any]
) -> dict[str, str]:
    """A family variant's child run: its parent's parameters less those the variant
    sets, the variant's axis values, and the prompt it asked."""
    values = {f"variant_{axis}": value for axis, value in variant["values"].items()}
    shots = run.get("few_shot") or {}
    return {
        **{k: v for k, v in parent.items() if k not in ("prompt_sha256", "shot_seed")},
        "variant": variant["id"],
        **values,
        "prompt_sha256": _text(run.get("prompt_sha256")),
        "shot_seed": _text(shots.get("seed")),
    }


#: The contexts in which a run's data is logged as an MLflow input.
INPUT_CONTEXTS = ("evaluation", "training", "validation")


def run_inputs(strategy_family: str | None, method: str | None, family: bool) -> list[str]:
    """The data a run used, by context: the evaluation sample always; the training split
    where it supplies shots, training or the baseline; a family's validation sample."""
    contexts = ["evaluation"]
    if strategy_family in ("few_shot", "finetuned") or method in ("probe", "tfidf"):
        contexts.append("training")
    if family:
        contexts.append("validation")
    return contexts


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


def write_run_list(tracked: Sequence[TrackedRun], path: str | os.PathLike[str]) -> None:
    """The runs logged: key, model, strategy, run id, experiment id, action (TSV)."""
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(RUN_LIST_COLUMNS)
        for run in tracked:
            writer.writerow([getattr(run, column) for column in RUN_LIST_COLUMNS])
