"""A model catalogue entry, typed: what the workflow's config says about one model."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SOURCES = ("embedded", "local", "hub", "finetuned", "openai")


@dataclass(frozen=True)
class ModelSpec:
    """How one model is loaded and prompted (config.yaml's ``model_catalogue`` entry).

    A fine-tuned entry (``source: finetuned``) is loaded as its ``base`` entry with the
    peft ``adapter`` folder on top, and has its own ``prompt_format``. Keys the loader
    does not need (``hub_id``, ``path``, ``gguf_package``...) stay in ``extra``.
    """

    name: str | None = None
    source: str = "local"
    dtype: str = "auto"
    quantization: str = "none"
    allow_fallback: bool = False
    revision: str | None = None
    trust_remote_code: bool = False
    prompt_format: str = "chat"
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    adapter: str | None = None
    base: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, entry: ModelSpec | Mapping[str, Any], name: str | None = None) -> ModelSpec:
        """A spec from a catalogue entry (a mapping), or ``entry`` itself."""
        if isinstance(entry, ModelSpec):
            return entry if name is None else dataclasses.replace(entry, name=name)
        fields = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in entry.items() if k in fields}
        extra = {k: v for k, v in entry.items() if k not in fields}
        values["chat_template_kwargs"] = dict(values.get("chat_template_kwargs") or {})
        if name is not None:
            values["name"] = name
        return cls(**values, extra=extra)

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    @property
    def is_finetuned(self) -> bool:
        return self.source == "finetuned"
