"""Snakemake adapter: turn an embedded GGUF model into a plain safetensors folder."""

import tempfile
from pathlib import Path

import _bootstrap  # noqa: F401 - makes emoprompt importable in any job environment

from emoprompt.infra.logs import setup_logging
from emoprompt.models.gguf import convert_gguf, embedded_gguf


def main(snakemake) -> None:
    setup_logging(snakemake.log[0])
    gguf = snakemake.params.gguf
    out = Path(snakemake.output[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    # A GGUF split over packages is assembled beside the output, and removed after.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.gguf-") as scratch:
        convert_gguf(embedded_gguf(gguf, scratch), out, dtype=gguf["dtype"])


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
