"""Snakemake adapter: a prompt family's variant chosen on the validation sample."""

import logging

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.evaluation.metrics import read_metadata
from emoprompt.evaluation.selection import write_choice
from emoprompt.infra.logs import setup_logging


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    choice = write_choice(
        snakemake.input.validation,
        read_metadata(snakemake.input.record),
        snakemake.output[0],
        snakemake.params.statistics,
    )
    logging.getLogger("choose_variant").info(
        "chosen %s (%s) of %d: validation macro F1 %.4f",
        choice["chosen"],
        choice["label"],
        choice["variants"],
        choice["validation"]["f1_macro"]["value"],
    )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
