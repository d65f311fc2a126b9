"""The workflow's configuration checked against its schema, with short messages.

A jsonschema error names the schema and dumps it whole; a user needs the key, the value,
what is allowed and where the value came from (``config.yaml``, a ``--configfile``, or
``--config`` on the command line or in a profile). :func:`config_problems` gives that,
one line per problem, at most a few problems.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

MAX_PROBLEMS = 3
SCHEMA_HINT = "every key is described in workflow/schemas/config.schema.yaml"


def _load_schema(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def _dotted(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _source(path: Sequence[Any], overrides: Mapping[str, Any], files: Sequence[str]) -> str:
    """Where the value at ``path`` came from: --config, the last --configfile that sets
    its top-level key, else config.yaml."""
    top = path[0] if path else None
    if top in overrides:
        return "--config (command line or profile)"
    for name in reversed(files):
        with open(name, encoding="utf-8") as handle:
            if top in (yaml.safe_load(handle) or {}):
                return name
    return "config.yaml"


def _describe(error: ValidationError, overrides: Mapping[str, Any], files: Sequence[str]) -> str:
    where = _source(list(error.absolute_path), overrides, files)
    key = _dotted(error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted((error.schema.get("properties") or {}).keys())
        extra = sorted(set(error.instance) - set(known)) if isinstance(error.instance, dict) else []
        lines = []
        for name in extra:
            full = [*error.absolute_path, name]
            source = _source(full, overrides, files)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
            lines.append(f"unknown key {_dotted(full)!r} (from {source}){hint}")
        return "\n".join(lines)
    value = error.instance
    if error.validator == "enum":
        allowed = ", ".join(map(str, error.validator_value))
        return f"{key} = {value!r} (from {where}): must be one of {allowed}"
    if error.validator in ("oneOf", "anyOf"):
        description = (error.schema.get("description") or "").strip().split(". ")[0]
        return f"{key} = {value!r} (from {where}) is not allowed: {description}"
    return f"{key} = {value!r} (from {where}): {error.message}"


def config_problems(
    config: Mapping[str, Any],
    schema_path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    configfiles: Sequence[str | Path] = (),
) -> list[str]:
    """One short line per problem of ``config`` (at most ``MAX_PROBLEMS``); [] when valid.

    ``overrides`` are the ``--config`` values, ``configfiles`` the ``--configfile``
    files: they name where a bad value came from.
    """
    schema = _load_schema(schema_path)
    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(dict(config)), key=lambda e: list(e.absolute_path))
    files = [str(f) for f in configfiles]
    lines: list[str] = []
    for error in errors:
        lines += _describe(error, dict(overrides or {}), files).splitlines()
    if len(lines) > MAX_PROBLEMS:
        lines = [*lines[:MAX_PROBLEMS], f"... and {len(lines) - MAX_PROBLEMS} more"]
    return lines


def config_error_message(problems: Sequence[str]) -> str:
    return "invalid configuration:\n" + "\n".join(f"  {p}" for p in problems) + f"\n({SCHEMA_HINT})"
