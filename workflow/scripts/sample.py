"""Snakemake adapter: draw the seeded evaluation sample and count its classes."""

import logging

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.data.sampling import write_sample
from emoprompt.infra.logs import setup_logging


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    table = write_sample(
        snakemake.input.train,
        snakemake.input.test,
        snakemake.output.sample,
        snakemake.output.distribution,
        size=snakemake.params.size,
        scheme=snakemake.params.scheme,
        seed=snakemake.params.seed,
    )
    logging.getLogger("sample").info("class counts:\n%s", table.to_string(index=False))


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
