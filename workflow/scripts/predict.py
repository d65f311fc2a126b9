"""Snakemake adapter: one (model, strategy) prediction job."""

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.evaluation.job import run_prediction
from emoprompt.infra.devices import job_gpu
from emoprompt.infra.logs import setup_logging
from emoprompt.infra.signals import interruptible


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    # local-gpus profile: one device per job; SIGTERM: no partial output, a line in the log
    with job_gpu(snakemake.resources), interruptible():
        run_prediction(
            model_name=snakemake.wildcards.model,
            entry=snakemake.params.entry,
            strategy_name=snakemake.wildcards.strategy,
            prompt_path=snakemake.input.prompt,
            train_path=snakemake.input.train,
            sample_path=snakemake.input.sample,
            settings=snakemake.params.settings,
            job_threads=snakemake.threads,
            tsv_out=snakemake.output.tsv,
            json_out=snakemake.output.json,
            workflow_dir=snakemake.scriptdir,
        )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
