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

from emoprompt.infra.provenance import git_commit
from emoprompt.tracking.client import (
    TrackingUnavailable,
    find_runs,
    get_experiment_id,
    request_limits,
    track_run,
    track_runs,
    track_training,
    upsert_run,
)
from emoprompt.tracking.records import (
    INPUT_CONTEXTS,
    KEY_TAG,
    RUN_LIST_COLUMNS,
    SUPERSEDED_TAG,
    TRACKING_URI_ENV,
    TRAINING_RUN_TAG,
    TRAINING_STRATEGY,
    FamilyFiles,
    RunFiles,
    TrackedRun,
    default_artifact_location,
    default_tracking_uri,
    prompt_artifact,
    redact_uri,
    resolve_tracking_uri,
    run_key,
    run_params,
    run_tags,
    sample_label,
    training_params,
    write_run_list,
)

__all__ = [
    "INPUT_CONTEXTS",
    "KEY_TAG",
    "RUN_LIST_COLUMNS",
    "SUPERSEDED_TAG",
    "TRACKING_URI_ENV",
    "TRAINING_RUN_TAG",
    "TRAINING_STRATEGY",
    "FamilyFiles",
    "RunFiles",
    "TrackedRun",
    "TrackingUnavailable",
    "default_artifact_location",
    "default_tracking_uri",
    "find_runs",
    "get_experiment_id",
    "git_commit",
    "prompt_artifact",
    "redact_uri",
    "request_limits",
    "resolve_tracking_uri",
    "run_key",
    "run_params",
    "run_tags",
    "sample_label",
    "track_run",
    "track_runs",
    "track_training",
    "training_params",
    "upsert_run",
    "write_run_list",
]
