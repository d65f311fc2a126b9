"""Snakemake adapter: the chosen variant's test predictions as the strategy's files."""

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.evaluation.metrics import read_metadata
from emoprompt.evaluation.selection import write_chosen
from emoprompt.infra.logs import setup_logging


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    write_chosen(
        read_metadata(snakemake.input.choice),
        snakemake.input.test,
        read_metadata(snakemake.input.record),
        snakemake.output.tsv,
        snakemake.output.json,
    )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
