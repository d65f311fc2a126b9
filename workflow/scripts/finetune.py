"""Snakemake adapter: train a LoRA adapter on the train split (resumes a killed run)."""

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.infra.devices import job_gpu
from emoprompt.infra.logs import setup_logging
from emoprompt.infra.signals import interruptible
from emoprompt.training.job import TrainingJob, train


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    # local-gpus profile: one device per job; SIGTERM: no partial output, a line in the log
    with job_gpu(snakemake.resources), interruptible():
        train(
            TrainingJob(
                model_name=snakemake.wildcards.model,
                entry=dict(snakemake.params.entry),
                train_path=snakemake.input.train,
                held_out_paths=[snakemake.input.validation, snakemake.input.test],
                validation_path=snakemake.input.validation,
                finetuned_prompt_path=snakemake.input.finetuned_prompt,
                zero_shot_prompt_path=snakemake.input.zero_shot_prompt,
                settings=dict(snakemake.params.settings),
                out_dir=snakemake.output.adapter,
                figure_path=snakemake.output.figure,
                threads=snakemake.threads,
            )
        )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
