"""Snakemake adapter: every variant of one (model, strategy)'s prompt family."""

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.evaluation.family import run_family
from emoprompt.infra.devices import job_gpu
from emoprompt.infra.logs import setup_logging
from emoprompt.infra.signals import interruptible


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    with job_gpu(snakemake.resources), interruptible():
        run_family(
            model_name=snakemake.wildcards.model,
            entry=snakemake.params.entry,
            strategy_name=snakemake.wildcards.strategy,
            prompt_path=snakemake.input.prompt,
            train_path=snakemake.input.train,
            validation_path=snakemake.input.validation,
            sample_path=snakemake.input.sample,
            settings=snakemake.params.settings,
            job_threads=snakemake.threads,
            validation_out=snakemake.output.validation,
            test_out=snakemake.output.test,
            json_out=snakemake.output.record,
            workflow_dir=snakemake.scriptdir,
        )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
