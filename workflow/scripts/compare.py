"""Snakemake adapter: paired comparisons of every run, and the pictures of the intervals."""

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.evaluation.comparisons import Run, compare_runs, write_comparisons
from emoprompt.evaluation.metrics import read_metadata
from emoprompt.evaluation.predictions import read_predictions
from emoprompt.evaluation.statistics import StatisticsSettings
from emoprompt.infra.logs import setup_logging
from emoprompt.reporting.significance import write_significance_figures


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    settings = StatisticsSettings.from_mapping(snakemake.params.statistics)
    runs = [
        Run(f"{model}/{strategy}", read_predictions(path))
        for (model, strategy), path in zip(
            snakemake.params.pairs, snakemake.input.predictions, strict=True
        )
    ]
    table = compare_runs(
        runs, settings, baseline=snakemake.params.baseline, families=snakemake.params.families
    )
    write_comparisons(table, settings, snakemake.output.md, snakemake.output.csv)
    write_significance_figures(
        [read_metadata(path) for path in snakemake.input.metrics],
        table,
        snakemake.output.forest,
        snakemake.output.differences,
        snakemake.params.baseline,
        settings.confidence,
    )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
