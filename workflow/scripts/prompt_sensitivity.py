"""Snakemake adapter: the spread of each strategy's score over its prompt family."""

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.evaluation.metrics import read_metadata
from emoprompt.evaluation.predictions import read_predictions
from emoprompt.infra.logs import setup_logging
from emoprompt.reporting.sensitivity import write_sensitivity


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    baseline = snakemake.input.baseline
    write_sensitivity(
        snakemake.params.pairs,
        [read_predictions(path) for path in snakemake.input.test],
        [read_metadata(path) for path in snakemake.input.choices],
        [read_metadata(path) for path in snakemake.input.metrics],
        read_metadata(baseline[0]) if baseline else None,
        snakemake.output.md,
        snakemake.output.csv,
        snakemake.output.figure,
    )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
