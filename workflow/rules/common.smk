# Glue between Snakemake and the study plan (emoprompt.plan): every decision (which
# jobs, their inputs, parameters and outputs, what is refused) is the Study's; the
# functions here only unpack wildcards for it.
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

# The package lives under src/: importable here even when it is not installed (jobs'
# scripts do the same through scripts/_bootstrap.py).
SRC = str(Path(workflow.basedir) / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

from emoprompt.infra.signals import stop_jobs_on_termination  # noqa: E402, F401 - onstart
from emoprompt.plan import (  # noqa: E402
    GRID_SAMPLE,
    NO_SHOTS,
    PROMPT_FILES,
    SENSITIVITY_OUTPUTS,
    VARIANT_FILES,
    ConfigError,
    Grid,
    Study,
    StudyError,
    all_outputs,
    check_config,
    check_prompt_files,
    grid_path,
)
from emoprompt.prompting.prompt_file import PromptError  # noqa: E402

try:
    check_config(
        config,
        workflow.basedir,
        overrides=workflow.config_settings.config,
        configfiles=workflow.config_settings.configfiles,
    )
    STUDY = Study(config)
    GRID = Grid(STUDY)
    for _line in check_prompt_files(STUDY) + STUDY.warnings():
        logger.warning(_line)
except (ConfigError, StudyError, PromptError) as exc:
    raise WorkflowError(str(exc)) from None


wildcard_constraints:
    model=STUDY.model_pattern(),
    strategy="|".join(STUDY.llm_strategies()),


def all_cores():
    """Threads of the heavy jobs: every core given with --cores; 1 where none are given
    (a cluster run, where the profile's set-threads decides)."""
    return workflow.resource_settings.cores or 1


def model_entry(wildcards):
    return STUDY.entry(wildcards.model)


def model_files(wildcards):
    return STUDY.model_files(wildcards.model)
