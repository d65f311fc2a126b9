"""What a job knows of its model: the serialised catalogue entry, read back typed.

The workflow gives each job one mapping, :meth:`emoprompt.models.catalogue.Catalogue.resolved`:
the entry with every default filled, where it loads from (``location``) and, for a
fine-tuned entry, its base's keys with the adapter folder on top. Defaults are the
catalogue types' own (a spec built by hand, in tests, gets the same ones).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from emoprompt.models.catalogue import ENTRY_TYPES, EmbeddedEntry, ServedEntry

_LOADED = EmbeddedEntry.model_fields


@dataclass(frozen=True)
class ModelSpec:
    """How one model is loaded and prompted.

    ``location`` is the folder or hub id it loads from (for a served model, its
    tokenizer's; empty when it has none). A fine-tuned entry (``source: finetuned``)
    loads as its ``base`` with the peft ``adapter`` folder on top. ``served`` holds a
    ``source: openai`` entry's server settings.
    """

    name: str | None = None
    source: str = "local"
    location: str = ""
    dtype: str = _LOADED["dtype"].default
    quantization: str = _LOADED["quantization"].default
    allow_fallback: bool = _LOADED["allow_fallback"].default
    revision: str | None = None
    prompt_format: str = "chat"
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    adapter: str | None = None
    base: str | None = None
    served: ServedEntry | None = None

    @classmethod
    def of(cls, entry: ModelSpec | Mapping[str, Any], name: str | None = None) -> ModelSpec:
        """A spec from a serialised entry (a mapping), or ``entry`` itself."""
        if isinstance(entry, ModelSpec):
            return entry if name is None else dataclasses.replace(entry, name=name)
        fields = {f.name for f in dataclasses.fields(cls)}
        known = fields | {key for kind in ENTRY_TYPES.values() for key in kind.model_fields}
        unknown = sorted(set(entry) - known)
        if unknown:
            shown = name or entry.get("name")
            raise ValueError(f"model entry {shown}: unknown key(s) {', '.join(unknown)}")
        values = {key: value for key, value in entry.items() if key in fields}
        values["chat_template_kwargs"] = dict(values.get("chat_template_kwargs") or {})
        if entry.get("source") == "openai":
            own = {k: v for k, v in entry.items() if k in ServedEntry.model_fields}
            values["served"] = ServedEntry.model_validate(own)
        if name is not None:
            values["name"] = name
        return cls(**values)

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    @property
    def is_finetuned(self) -> bool:
        return self.source == "finetuned"
