"""Make the emoprompt package importable in a job whose environment lacks it.

Snakemake puts this folder on the job's sys.path; in the project's virtual environment
the package is installed and this does nothing, in a per-rule conda environment the
source tree next to the workflow is used.
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("emoprompt") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
