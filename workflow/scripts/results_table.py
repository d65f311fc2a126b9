"""Snakemake adapter: the results table (Markdown and CSV) from every run's metrics."""

import logging

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.evaluation.comparisons import read_comparisons, summary_lines
from emoprompt.evaluation.statistics import StatisticsSettings
from emoprompt.infra.logs import setup_logging
from emoprompt.reporting.results import write_results_table


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    settings = StatisticsSettings.from_mapping(snakemake.params.statistics)
    notes = summary_lines(read_comparisons(snakemake.input.comparisons), settings)
    table = write_results_table(
        snakemake.input.metrics,
        snakemake.output.md,
        snakemake.output.csv,
        model_order=snakemake.params.models,
        notes=[*notes, "Paired comparisons of every row: results/comparisons.md."],
    )
    logging.getLogger("results_table").info("results:\n%s", table.to_string(index=False))


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
