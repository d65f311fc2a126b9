"""The model catalogue: one typed entry per source, each owning its keys, its defaults,
where its weights live, which files its jobs depend on and which methods it cannot run.

config.yaml's ``model_catalogue`` maps a name to an entry; its ``source`` picks the type:

- ``embedded``: a GGUF inside an installed Python package, converted once to
  ``data/models/<name>/`` (rule convert_model);
- ``hub``: a model hub id, fetched by the job;
- ``local``: a folder of saved weights;
- ``finetuned``: another entry (the base) with a LoRA adapter on top, trained by rule
  finetune unless an adapter folder is given; it loads as its base does;
- ``openai``: a model behind an OpenAI-compatible server (vLLM or a hosted API).

Every default of an entry is written once, here; the schema's catalogue part has no
defaults (``tests/test_plan.py`` holds the two to the same keys and values). A job gets
one serialised entry, :meth:`Catalogue.resolved`, which :class:`emoprompt.models.spec.ModelSpec`
reads back.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from emoprompt.infra.errors import UserError

PromptFormat = Literal["chat", "plain", "text"]
MODELS_DIR = "data/models"


#: The methods a served model cannot run, per API: a server has no hidden states (the
#: probe); a chat API returns no log-probabilities of given answers (label likelihood).
SERVED_REFUSALS = {
    "completions": frozenset({"probe"}),
    "chat": frozenset({"probe", "label_likelihood"}),
}


class CatalogueError(UserError, ValueError):
    """A catalogue entry is malformed; the message names the entry and the key."""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Whether the model runs in this process (and so can be fine-tuned or inspected).
    in_process: ClassVar[bool] = True

    prompt_format: PromptFormat
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)

    def refused_methods(self) -> frozenset[str]:
        """Methods (``emoprompt.evaluation.strategies.Strategy.method``) it cannot run."""
        return frozenset()

    def location(self, name: str, catalogue: Catalogue) -> str:
        """Where the model (or, for a served one, its tokenizer) is loaded from."""
        raise NotImplementedError

    def input_files(self, name: str, catalogue: Catalogue) -> list[str]:
        """The files a job of this model waits for (none for a hub id: the job fetches it)."""
        return [self.location(name, catalogue)]

    def resolved(self, name: str, catalogue: Catalogue) -> dict[str, Any]:
        """The serialised entry a job gets: every key with its value, defaults included."""
        return {
            "name": name,
            **self.model_dump(mode="json"),
            "location": self.location(name, catalogue),
        }

    def check(self, name: str, catalogue: Catalogue) -> None:
        """Cross-entry checks (an entry that names another one)."""

    def missing(self, name: str, catalogue: Catalogue) -> list[str]:
        """What the user must provide and has not: checked for the models a study runs,
        when the workflow starts (no output of a rule stands in for it)."""
        return []


class _Loaded(_Entry):
    """An entry whose weights load in this process."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "nf4"] = "none"
    allow_fallback: bool = False


class GgufPart(BaseModel):
    """One piece of a GGUF split over several packages: a file inside a package."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    package: str
    file: str


class EmbeddedEntry(_Loaded):
    """A GGUF inside an installed package (``gguf_package``), or split over several
    (``gguf_parts``, concatenated in order into ``gguf_file``); ``gguf_sha256`` pins it."""

    source: Literal["embedded"]
    gguf_file: str
    gguf_package: str | None = None
    gguf_parts: list[GgufPart] = Field(default_factory=list)
    gguf_sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")] | None = None

    def location(self, name: str, catalogue: Catalogue) -> str:
        return f"{MODELS_DIR}/{name}"

    def check(self, name: str, catalogue: Catalogue) -> None:
        if (self.gguf_package is None) == (not self.gguf_parts):
            raise CatalogueError(
                f"model_catalogue: {name}: give either gguf_package (the GGUF inside one "
                "package) or gguf_parts (a GGUF split over several), not "
                + ("both" if self.gguf_package else "neither")
            )

    def gguf_source(self) -> dict[str, Any]:
        """What rule convert_model converts."""
        return {
            "package": self.gguf_package,
            "file": self.gguf_file,
            "parts": [part.model_dump() for part in self.gguf_parts],
            "sha256": self.gguf_sha256,
            "dtype": self.dtype,
        }


class HubEntry(_Loaded):
    source: Literal["hub"]
    hub_id: str
    revision: str = "main"

    def location(self, name: str, catalogue: Catalogue) -> str:
        return self.hub_id

    def input_files(self, name: str, catalogue: Catalogue) -> list[str]:
        return []


class LocalEntry(_Loaded):
    source: Literal["local"]
    path: str

    def location(self, name: str, catalogue: Catalogue) -> str:
        return self.path

    def missing(self, name: str, catalogue: Catalogue) -> list[str]:
        if Path(self.path).is_dir():
            return []
        return [f"model_catalogue: {name}: path {self.path!r} is not a folder (a local entry "
                "loads its saved model from there)"]  # fmt: skip


class FinetunedEntry(_Entry):
    source: Literal["finetuned"]
    base: str
    adapter: str | None = None  # default: what rule finetune writes for the base

    def adapter_folder(self) -> str:
        return self.adapter or f"{MODELS_DIR}/{self.base}-ft"

    def location(self, name: str, catalogue: Catalogue) -> str:
        return catalogue.location(self.base)

    def input_files(self, name: str, catalogue: Catalogue) -> list[str]:
        return [*catalogue.input_files(self.base), self.adapter_folder()]

    def missing(self, name: str, catalogue: Catalogue) -> list[str]:
        return catalogue.missing(self.base)

    def resolved(self, name: str, catalogue: Catalogue) -> dict[str, Any]:
        """The base's entry (dtype, quantization...) with this entry's own keys on top."""
        own = {"source": self.source, "base": self.base, "prompt_format": self.prompt_format}
        return {
            **catalogue.resolved(self.base),
            **own,
            "name": name,
            "adapter": self.adapter_folder(),
        }

    def check(self, name: str, catalogue: Catalogue) -> None:
        base = catalogue.entries.get(self.base)
        if base is None or isinstance(base, FinetunedEntry):
            raise CatalogueError(
                f"model_catalogue: {name} is fine-tuned from {self.base!r}, which must be a "
                "catalogue entry that is not itself fine-tuned"
            )


class ServedEntry(_Entry):
    """A model behind an OpenAI-compatible server: prompts tokenised here and sent as
    token ids (``api: completions``), or chat turns sent to its chat API (``api: chat``)."""

    in_process: ClassVar[bool] = False

    source: Literal["openai"]
    base_url: Annotated[str, Field(pattern=r"^https?://")]
    served_model: Annotated[str, Field(min_length=1)]
    api: Literal["completions", "chat"] = "completions"
    tokenizer: str | None = None
    adapter: str | None = None  # the adapter the server serves (its label set is used)
    top_logprobs: Annotated[int, Field(ge=1)] = 20
    api_key_env: str | None = None
    max_concurrency: Annotated[int, Field(ge=1)] = 8
    timeout: Annotated[float, Field(gt=0)] = 120
    retries: Annotated[int, Field(ge=0)] = 4

    def refused_methods(self) -> frozenset[str]:
        return SERVED_REFUSALS[self.api]

    def location(self, name: str, catalogue: Catalogue) -> str:
        return catalogue.location(self.tokenizer) if self.tokenizer else ""

    def input_files(self, name: str, catalogue: Catalogue) -> list[str]:
        tokenizer = catalogue.input_files(self.tokenizer) if self.tokenizer else []
        return [*tokenizer, *([self.adapter] if self.adapter else [])]

    def missing(self, name: str, catalogue: Catalogue) -> list[str]:
        return catalogue.missing(self.tokenizer) if self.tokenizer else []

    def check(self, name: str, catalogue: Catalogue) -> None:
        if self.api == "completions" and not self.tokenizer:
            raise CatalogueError(
                f"model_catalogue: {name} is served (source: openai) and needs tokenizer "
                "(api: completions sends token ids; api: chat sends chat turns)"
            )
        if self.api == "chat" and self.prompt_format != "chat":
            raise CatalogueError(
                f"model_catalogue: {name}: api: chat sends chat turns and needs "
                "prompt_format: chat (a plain prompt needs api: completions)"
            )
        if self.tokenizer is None:
            return
        other = catalogue.entries.get(self.tokenizer)
        if other is None or not isinstance(other, _Loaded):
            raise CatalogueError(
                f"model_catalogue: {name}: tokenizer {self.tokenizer!r} must be a catalogue "
                "entry that loads in process (embedded, local or hub): the model the server "
                "serves"
            )


Entry = Annotated[
    EmbeddedEntry | HubEntry | LocalEntry | FinetunedEntry | ServedEntry,
    Field(discriminator="source"),
]
ENTRY_TYPES: dict[str, type[_Entry]] = {
    "embedded": EmbeddedEntry,
    "hub": HubEntry,
    "local": LocalEntry,
    "finetuned": FinetunedEntry,
    "openai": ServedEntry,
}
_ENTRY = TypeAdapter(Entry)


def _problem(name: str, values: Mapping[str, Any], error: ValidationError) -> str:
    """The first problem of an entry, in one line naming the entry and the key."""
    first = error.errors()[0]
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return (
            f"model_catalogue: {name}: source = {values.get('source')!r}: must be one of "
            + ", ".join(ENTRY_TYPES)
        )
    key = ".".join(str(p) for p in first["loc"][1:]) or "source"
    kind, value = first["type"], first.get("input")
    if kind == "extra_forbidden":
        source = first["loc"][0]
        known = ", ".join(sorted(ENTRY_TYPES[source].model_fields)) if source in ENTRY_TYPES else ""
        return f"model_catalogue: {name}: key {key!r} is not one of a {source} entry's ({known})"
    if kind == "missing":
        return f"model_catalogue: {name}: a {first['loc'][0]} entry needs {key}"
    return f"model_catalogue: {name}: {key} = {value!r}: {first['msg']}"


def parse_entry(name: str, values: Mapping[str, Any]) -> _Entry:
    """One typed entry from its mapping, or a :class:`CatalogueError` naming it."""
    try:
        return _ENTRY.validate_python(dict(values))
    except ValidationError as exc:
        raise CatalogueError(_problem(name, values, exc)) from None


class Catalogue:
    """Every entry of ``model_catalogue``, typed and checked against each other."""

    def __init__(self, entries: Mapping[str, Mapping[str, Any]]):
        self.entries: dict[str, _Entry] = {
            name: parse_entry(name, values) for name, values in entries.items()
        }
        for name, entry in self.entries.items():
            entry.check(name, self)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> _Entry:
        return self.entries[name]

    def names(self) -> list[str]:
        return list(self.entries)

    def location(self, name: str) -> str:
        return self.entries[name].location(name, self)

    def input_files(self, name: str) -> list[str]:
        return self.entries[name].input_files(name, self)

    def resolved(self, name: str) -> dict[str, Any]:
        return self.entries[name].resolved(name, self)

    def missing(self, name: str) -> list[str]:
        return self.entries[name].missing(name, self)

    def of_type(self, kind: type[_Entry]) -> list[str]:
        return [name for name, entry in self.entries.items() if isinstance(entry, kind)]

    def adapter_folder(self, name: str) -> str:
        entry = self.entries[name]
        if not isinstance(entry, FinetunedEntry):
            raise CatalogueError(f"model_catalogue: {name} is not a fine-tuned entry")
        return entry.adapter_folder()
