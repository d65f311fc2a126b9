"""Snakemake adapter: the TF-IDF baseline, with the same output files as the LLM jobs."""

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.evaluation.job import run_baseline_job
from emoprompt.infra.logs import setup_logging


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    run_baseline_job(
        snakemake.input.train,
        snakemake.input.sample,
        snakemake.params.seed,
        snakemake.output.tsv,
        snakemake.output.json,
    )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
