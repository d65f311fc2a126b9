"""Snakemake adapter: a study grid's table (mean ± std and interval over seeds), its
figure, and the paired comparisons pooled over the grid's samples."""

import logging

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.evaluation.comparisons import SeededRun, compare_pooled, write_pooled
from emoprompt.evaluation.predictions import read_predictions
from emoprompt.evaluation.statistics import StatisticsSettings
from emoprompt.infra.logs import setup_logging
from emoprompt.reporting.grid import write_grid_outputs


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    settings = StatisticsSettings.from_mapping(snakemake.params.statistics)
    table = write_grid_outputs(
        snakemake.input.metrics,
        snakemake.output.md,
        snakemake.output.csv,
        snakemake.output.figure,
        model_order=snakemake.params.models,
        confidence=settings.confidence,
    )
    logging.getLogger("grid_table").info("grid:\n%s", table.to_string(index=False))
    runs = [
        SeededRun(name, seed, read_predictions(path))
        for (name, seed), path in zip(
            snakemake.params.runs, snakemake.input.predictions, strict=True
        )
    ]
    pooled = compare_pooled(runs, settings, baseline=snakemake.params.baseline)
    write_pooled(
        pooled, settings, snakemake.output.comparisons_md, snakemake.output.comparisons_csv
    )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
