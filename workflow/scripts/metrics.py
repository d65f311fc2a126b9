"""Snakemake adapter: score one (model, strategy) run and draw its confusion matrices."""

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.evaluation.metrics import write_metrics
from emoprompt.evaluation.statistics import StatisticsSettings
from emoprompt.infra.logs import setup_logging
from emoprompt.reporting.results import confusion_title, write_confusion_figure


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    metrics = write_metrics(
        snakemake.input.tsv,
        snakemake.input.json,
        snakemake.output.metrics,
        model=snakemake.wildcards.model,
        strategy=snakemake.wildcards.strategy,
        statistics=StatisticsSettings.from_mapping(snakemake.params.statistics),
    )
    write_confusion_figure(
        metrics["confusion"],
        snakemake.output.figure,
        labels=metrics["labels"],
        title=confusion_title(metrics),
    )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
