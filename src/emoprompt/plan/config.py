"""The workflow's configuration: read, checked against its schema, defaults filled.

Snakemake and the importable :class:`emoprompt.plan.Study` read the configuration the
same way, so what a test of the study plan sees is what a run sees: the schema
(``workflow/schemas/config.schema.yaml``) is the one place a default is written, and
filling it in here is the same filling that ``snakemake.utils.validate`` does.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators

from emoprompt.infra.config_check import config_error_message, config_problems
from emoprompt.infra.errors import UserError

SCHEMA = Path("workflow") / "schemas" / "config.schema.yaml"
CONFIG = Path("config.yaml")


class ConfigError(UserError, ValueError):
    """The configuration breaks the schema; the message names key, value and source."""


def load_schema(root: str | Path = ".") -> dict[str, Any]:
    return yaml.safe_load((Path(root) / SCHEMA).read_text(encoding="utf-8"))


def _with_defaults(validator_class):
    """A validator that fills each missing property with its schema default (the
    jsonschema FAQ's recipe, which Snakemake's ``validate`` uses)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        for name, subschema in properties.items():
            if "default" in subschema and isinstance(instance, dict):
                instance.setdefault(name, copy.deepcopy(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


def check_config(
    config: dict[str, Any],
    root: str | Path = ".",
    *,
    overrides: Mapping[str, Any] | None = None,
    configfiles: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Refuse a bad configuration (:class:`ConfigError`, a few lines that name each bad
    key, its value and where it came from), else fill its defaults in place."""
    schema_path = Path(root) / SCHEMA
    problems = config_problems(config, schema_path, overrides=overrides, configfiles=configfiles)
    if problems:
        raise ConfigError(config_error_message(problems))
    schema = load_schema(root)
    _with_defaults(Draft202012Validator)(schema).validate(config)
    return config


def merged_config(
    root: str | Path = ".", overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """config.yaml under ``root`` with ``overrides`` on top (as ``--config`` gives them),
    checked, its defaults filled."""
    config = yaml.safe_load((Path(root) / CONFIG).read_text(encoding="utf-8")) or {}
    config.update(copy.deepcopy(dict(overrides or {})))
    return check_config(config, root, overrides=overrides)
