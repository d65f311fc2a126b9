"""Snakemake adapter: write the model inspection page (tokenizer, size, architecture)."""

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.infra.logs import setup_logging
from emoprompt.infra.signals import interruptible
from emoprompt.reporting.inspection import write_inspection


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    with interruptible():  # SIGTERM: no partial output, a line in the log
        write_inspection(
            model_name=snakemake.wildcards.model,
            entry=snakemake.params.entry,
            sample_path=snakemake.input.sample,
            prompt_path=snakemake.input.prompt,
            finetuned_prompt_path=snakemake.input.finetuned_prompt,
            out=snakemake.output[0],
        )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
