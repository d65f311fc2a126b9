"""Snakemake adapter: a study grid's table (mean ± std over seeds) and its figure."""

import logging

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.infra.logs import setup_logging
from emoprompt.reporting.grid import write_grid_outputs


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    table = write_grid_outputs(
        snakemake.input.metrics,
        snakemake.output.md,
        snakemake.output.csv,
        snakemake.output.figure,
        model_order=snakemake.params.models,
    )
    logging.getLogger("grid_table").info("grid:\n%s", table.to_string(index=False))


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
