"""Snakemake adapter: the validation tweets a prompt family's variants are chosen on."""

import logging

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.data.sampling import write_validation_sample
from emoprompt.infra.logs import setup_logging


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    chosen = write_validation_sample(
        snakemake.input.validation,
        snakemake.input.sample,
        snakemake.output[0],
        size=snakemake.params.size,
        seed=snakemake.params.seed,
    )
    logging.getLogger("validation_sample").info("%d validation tweets", len(chosen))


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
