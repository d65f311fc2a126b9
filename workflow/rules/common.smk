import sys
from pathlib import Path

from snakemake.utils import validate

# The logic lives in the emoprompt package under src/: importable here even when the
# package is not installed (jobs' scripts do the same through scripts/_bootstrap.py).
SRC = str(Path(workflow.basedir) / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

from emoprompt.download import source_kind  # noqa: E402

validate(config, schema="../schemas/config.schema.yaml", set_default=True)


def raw_data_path():
    """Where the raw data goes (a zip, or a folder when the source is a folder)."""
    if source_kind(config["data_source"]) == "folder":
        return "data/raw/emoeval_data"
    return "data/raw/emoeval_data.zip"


def raw_data_output():
    path = raw_data_path()
    return directory(path) if not path.endswith(".zip") else path


def local_source():
    """A local data source is an input, so that editing it re-runs the data steps"""
    if source_kind(config["data_source"]) == "url":
        return []
    return config["data_source"]


def data_outputs():
    return [
        "data/processed/train.tsv",
        "data/processed/test.tsv",
        "data/processed/test_sample.tsv",
        "results/data/class_distribution.tsv",
    ]


def all_outputs():
    """Everything `snakemake` builds by default."""
    return data_outputs()
