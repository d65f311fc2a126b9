"""The GPU check (emoprompt.bench.gpu_check): Llama-3.2-1B's shape, random weights, in
bfloat16 and NF4 on one accelerator; the engine proven against the plain reference and
timed against the course notebook's way.

    python scripts/gpu_check.py bundle --out gpu-check-bundle   # here, with the data
    python scripts/gpu_check.py run --bundle gpu-check-bundle --out results/gpu_check

Runs from a bare checkout too (a GPU machine with torch and transformers): ``src/`` is
put on the path.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from emoprompt.bench.gpu_check import main  # after the path is set

if __name__ == "__main__":
    raise SystemExit(main())
