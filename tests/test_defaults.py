"""Every default is written once and agrees everywhere: the schema (the one place a
setting's default is written), config.yaml (which shows them to the user), the code's
settings types, and the model catalogue's entry types (which own the defaults of an
entry: the schema's catalogue part has none)."""

from __future__ import annotations

import dataclasses
from typing import Any, get_args

import pytest
import yaml
from conftest import REPO

from emoprompt.evaluation.family import FamilySettings
from emoprompt.evaluation.job import settings_from_config
from emoprompt.evaluation.probe import ProbeSettings
from emoprompt.evaluation.strategies import STRATEGIES, Settings
from emoprompt.models.catalogue import ENTRY_TYPES
from emoprompt.models.spec import ModelSpec
from emoprompt.plan.config import load_schema
from emoprompt.training.settings import FinetuneSettings

SCHEMA = load_schema(REPO)
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
#: config.yaml's model catalogue is the catalogue itself, not a default setting.
NOT_DEFAULTS = {"model_catalogue"}


def schema_defaults(schema: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """key path -> default, for every property of ``schema`` that has one."""
    found = {}
    for name, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}{name}"
        if "default" in sub and not (sub.get("type") == "object" and "properties" in sub):
            found[path] = sub["default"]
        if sub.get("type") == "object" and "properties" in sub:
            found.update(schema_defaults(sub, f"{path}."))
    return found


def config_values(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    found = {}
    for name, value in config.items():
        if isinstance(value, dict) and name not in NOT_DEFAULTS:
            found.update(config_values(value, f"{prefix}{name}."))
        elif name not in NOT_DEFAULTS:
            found[f"{prefix}{name}"] = value
    return found


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def test_config_yaml_sets_every_key_to_its_schema_default():
    defaults, values = schema_defaults(SCHEMA), config_values(CONFIG)
    assert set(values) <= set(defaults), set(values) - set(defaults)
    differ = {k: (defaults[k], v) for k, v in values.items() if defaults[k] != v}
    assert differ == {}


@pytest.mark.parametrize(
    ("section", "settings"),
    [
        ("finetune", FinetuneSettings()),
        ("probe", ProbeSettings()),
        ("prompt_variants", FamilySettings()),
    ],
)
def test_the_settings_types_default_to_the_schema(section, settings):
    defaults = {
        k.removeprefix(f"{section}."): v
        for k, v in schema_defaults(SCHEMA).items()
        if k.startswith(f"{section}.")
    }
    code = {f.name: plain(getattr(settings, f.name)) for f in dataclasses.fields(settings)}
    assert set(code) == set(SCHEMA["properties"][section]["properties"])
    assert {k: code[k] for k in defaults} == defaults


def test_a_strategy_without_settings_runs_with_the_schema_defaults():
    defaults = schema_defaults(SCHEMA)
    expected = Settings(
        max_new_tokens=defaults["decoding.max_new_tokens"],
        do_sample=defaults["decoding.do_sample"],
        temperature=defaults["decoding.temperature"],
        seed=defaults["decoding.seed"],
        fallback_label=defaults["fallback_label"],
        length_normalize=defaults["scoring.length_normalize"],
        calibrate=defaults["scoring.calibrate"],
    )
    assert Settings() == expected == settings_from_config({})
    assert set(SCHEMA["properties"]["strategies"]["items"]["enum"]) == set(STRATEGIES)


def test_the_catalogue_types_own_every_entry_key_and_default():
    entry = SCHEMA["properties"]["model_catalogue"]["additionalProperties"]
    properties = entry["properties"]
    assert not [k for k, v in properties.items() if "default" in v], "defaults belong to the types"
    fields = {name for kind in ENTRY_TYPES.values() for name in kind.model_fields}
    assert set(properties) == fields
    assert properties["source"]["enum"] == list(ENTRY_TYPES)
    for kind in ENTRY_TYPES.values():
        for name, field in kind.model_fields.items():
            if name == "source":
                continue
            allowed = get_args(field.annotation)
            if "enum" in properties[name] and allowed and all(isinstance(a, str) for a in allowed):
                assert sorted(allowed) == sorted(properties[name]["enum"]), (kind, name)
    # A spec built by hand (tests, benchmarks) gets the types' defaults.
    loaded = ENTRY_TYPES["local"].model_fields
    spec = ModelSpec()
    assert (spec.dtype, spec.quantization, spec.allow_fallback) == (
        loaded["dtype"].default,
        loaded["quantization"].default,
        loaded["allow_fallback"].default,
    )
