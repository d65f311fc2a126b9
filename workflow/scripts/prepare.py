"""Snakemake adapter: validate the raw splits and write the canonical train/test TSVs."""

import logging

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.data.splits import prepare
from emoprompt.infra.logs import setup_logging


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    counts = prepare(snakemake.input[0], snakemake.output.train, snakemake.output.test)
    logging.getLogger("prepare").info(
        "prepared %d train and %d test tweets", counts["train"], counts["test"]
    )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
