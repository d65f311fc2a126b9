"""Snakemake adapter: validate the raw splits and write the canonical train, validation
and test TSVs with the record of their ids."""

import logging

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.data.prepare import Prepared, prepare
from emoprompt.infra.logs import setup_logging


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    out = snakemake.output
    counts = prepare(
        snakemake.params.data,
        Prepared(out.train, out.validation, out.test, out.ids),
        validation_size=snakemake.params.validation_size,
        seed=snakemake.params.validation_seed,
    )
    logging.getLogger("prepare").info(
        "prepared %d train, %d validation and %d test tweets",
        counts["train"],
        counts["validation"],
        counts["test"],
    )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
