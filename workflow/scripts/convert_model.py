"""Snakemake adapter: turn an embedded GGUF model into a plain safetensors folder."""

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.infra.logs import setup_logging
from emoprompt.models.gguf import convert_gguf, embedded_gguf_path


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    gguf = snakemake.params.gguf
    path = embedded_gguf_path(gguf["package"], gguf["file"])
    convert_gguf(path, snakemake.output[0], dtype=gguf["dtype"])


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
