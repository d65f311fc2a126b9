"""Snakemake adapter: fetch the data source and record its provenance."""

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.data.download import RECORD, fetch_keeping_previous
from emoprompt.infra.files import write_json
from emoprompt.infra.logs import setup_logging


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    provenance = fetch_keeping_previous(
        snakemake.params.source,
        snakemake.params.data,
        RECORD,
        sha256=snakemake.params.sha256,
        timeout=snakemake.params.timeout,
        retries=snakemake.params.retries,
    )
    write_json(snakemake.output.provenance, provenance.as_dict())


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
