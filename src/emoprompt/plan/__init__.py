"""The study plan: the configuration, the model catalogue and every job, in Python.

:class:`Study` is what the Snakefile's rules ask (``workflow/rules/common.smk``); tests
import it without a Snakemake process.
"""

from emoprompt.plan.checks import check_prompt_files
from emoprompt.plan.config import ConfigError, check_config, merged_config
from emoprompt.plan.grid import GRID_SAMPLE, NO_SHOTS, Grid, all_outputs, grid_path
from emoprompt.plan.study import (
    PROMPT_FILES,
    SENSITIVITY_OUTPUTS,
    VARIANT_FILES,
    Study,
    StudyError,
)

__all__ = [
    "GRID_SAMPLE",
    "NO_SHOTS",
    "PROMPT_FILES",
    "SENSITIVITY_OUTPUTS",
    "VARIANT_FILES",
    "ConfigError",
    "Grid",
    "Study",
    "StudyError",
    "all_outputs",
    "check_config",
    "check_prompt_files",
    "grid_path",
    "merged_config",
]
