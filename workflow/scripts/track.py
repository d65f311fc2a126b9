"""Snakemake adapter: log every (model, strategy) run to MLflow (the only MLflow writer)."""

from pathlib import Path

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.infra.logs import setup_logging
from emoprompt.tracking import (
    INPUT_CONTEXTS,
    FamilyFiles,
    RunFiles,
    resolve_tracking_uri,
    track_runs,
    write_run_list,
)


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    inputs = snakemake.input
    pairs = snakemake.params.pairs
    # A study grid's runs each have their own seeds (params.samples); other runs share them.
    samples = snakemake.params.get("samples") or [None] * len(pairs)
    # A prompt family's run has child runs, one per variant.
    families = {
        tuple(pair): FamilyFiles(*map(Path, files))
        for pair, *files in zip(
            snakemake.params.get("families") or [],
            inputs.get("family_records", []),
            inputs.get("family_validation", []),
            inputs.get("family_test", []),
            inputs.get("family_choices", []),
            strict=True,
        )
    }
    runs = [
        RunFiles(
            *(model, strategy, Path(tsv), Path(meta), Path(metrics), Path(figure), own),
            families.get((model, strategy)),
        )
        for (model, strategy), tsv, meta, metrics, figure, own in zip(
            pairs,
            inputs.predictions,
            inputs.metadata,
            inputs.metrics,
            inputs.figures,
            samples,
            strict=True,
        )
    ]
    results_dir = Path(snakemake.output.runs).parent
    uri, artifact_location = resolve_tracking_uri(results_dir)
    tracked = track_runs(
        runs,
        experiment=snakemake.params.experiment,
        tracking_uri=uri,
        sample=snakemake.params.sample,
        artifact_location=artifact_location,
        workflow_dir=snakemake.scriptdir,
        trainings=dict(zip(snakemake.params.trained, inputs.adapters, strict=True)),
        timeout=snakemake.params.get("timeout", 10),
        retries=snakemake.params.get("retries", 1),
        # the evaluation sample, the train split, a family's validation sample
        datasets=dict(zip(INPUT_CONTEXTS, inputs.get("samples", []), strict=False)),
    )
    write_run_list(tracked, snakemake.output.runs)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
