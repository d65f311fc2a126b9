"""Prompt files: what the user edits, one YAML file per prompt family, checked on load.

``zero_shot`` and ``few_shot`` files hold chat messages (system prompt, user turn, and
for few-shot the assistant turn, the number of shots and how they are selected);
``finetuned`` holds the plain template of a fine-tuned model and its label set. A base
model without a chat template (catalogue ``prompt_format: text``) reads the zero- and
few-shot families from plain-text files instead (``zero_shot_text.yaml``,
``few_shot_text.yaml``): an instruction, then a ``template`` block per tweet
(``Tuit: {tweet}`` / ``Emoción:``) whose ``answer`` (`` {label}``) solves it - the
shots as solved blocks, the tweet's block left open.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emoprompt.infra.errors import UserError
from emoprompt.labels import LABELS

FAMILY_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "zero_shot": {"system": str, "user": str, "variables": dict, "variants": dict},
    "few_shot": {
        "system": str,
        "user": str,
        "assistant": str,
        "shots": int,
        "selection": str,
        "seed": int,
        "manual_ids": list,
        "variables": dict,
        "variants": dict,
    },
    "finetuned": {"template": str, "labels": list, "label_map": dict, "variables": dict},
    # The zero- and few-shot families as plain text, for base models (prompt_format: text).
    "zero_shot_text": {
        "instruction": str,
        "template": str,
        "answer": str,
        "variables": dict,
        "variants": dict,
    },
    "few_shot_text": {
        "instruction": str,
        "template": str,
        "answer": str,
        "shots": int,
        "selection": str,
        "seed": int,
        "manual_ids": list,
        "variables": dict,
        "variants": dict,
    },
}
OPTIONAL_KEYS = {
    "zero_shot": {"variables", "variants"},
    "few_shot": {"manual_ids", "seed", "variables", "variants"},
    "finetuned": {"label_map", "variables"},
    "zero_shot_text": {"variables", "variants"},
    "few_shot_text": {"manual_ids", "seed", "variables", "variants"},
}
#: The placeholders each text key fills (besides the file's own ``variables``).
PLACEHOLDERS = {
    "system": ("labels",),
    "user": ("tweet",),
    "assistant": ("label",),
    "template": ("tweet",),
    "instruction": ("labels",),
    "answer": ("label",),
}
#: The families a base model (prompt_format: text) reads from plain-text files.
TEXT_FAMILIES = ("zero_shot", "few_shot")
#: ``{name}`` is a placeholder; ``{{name}}`` writes ``{name}`` itself; other braces (a
#: JSON example, say) are text.
PLACEHOLDER = re.compile(r"\{\{([A-Za-z_]\w*)\}\}|\{([A-Za-z_]\w*)\}")


def prompt_format(family: str) -> str:
    """``plain`` for the fine-tuned family's template, ``chat`` for the others (their
    chat files; a base model reads them as ``text``: :func:`file_family`)."""
    return "plain" if family == "finetuned" else "chat"


def file_family(family: str, model_format: str) -> str:
    """The prompt file a model of ``model_format`` reads for ``family``: the family's
    plain-text file (``zero_shot_text``...) for a base model (``text``), else its own."""
    return f"{family}_text" if model_format == "text" and family in TEXT_FAMILIES else family


class PromptError(UserError, ValueError):
    """A prompt file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class PromptFile:
    """A validated prompt file of one strategy family."""

    family: str
    path: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    text: bool = False  # the family's plain-text file, for a base model

    @property
    def format(self) -> str:
        """How the prompt is written: ``plain`` text (a fine-tuned model's template),
        ``text`` (instruction and solved blocks, for a base model) or through the
        model's ``chat`` template."""
        return "text" if self.text else prompt_format(self.family)

    def answers(self, labels: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """``labels`` (default: the prompt's) as an answer writes them right after the
        prompt: through the ``answer`` key in a plain-text file (`` Alegría``)."""
        labels = self.labels if labels is None else labels
        if not self.text:
            return labels
        return tuple(fill(self.settings["answer"], self.values(label=lab)) for lab in labels)

    @property
    def labels(self) -> tuple[str, ...]:
        """The answer labels this prompt asks for (the fine-tuned model has its own)."""
        return tuple(self.settings.get("labels", LABELS))

    @property
    def label_map(self) -> dict[str, str]:
        """Prompt label -> one of the seven classes."""
        mapping = {label: label for label in self.labels}
        mapping.update(self.settings.get("label_map", {}))
        return mapping

    def word(self, label: str) -> str:
        """The prompt's word for ``label`` (one of the seven classes): a verbalizer's
        word, the class itself where the prompt has no words of its own."""
        return next((w for w, c in self.label_map.items() if c == label), label)

    def values(self, **values: str) -> dict[str, str]:
        """What a text key's placeholders are filled with: the file's ``variables``,
        ``{labels}`` (the prompt's words, comma-separated), then ``values``."""
        listed = {"labels": ", ".join(self.labels)}
        return {**listed, **(self.settings.get("variables") or {}), **values}


def check_text_placeholders(
    data: Mapping[str, Any], path: Any, keys: tuple[str, ...] = tuple(PLACEHOLDERS)
) -> None:
    """Every ``{name}`` of a text key (of ``keys``) is one it fills or one the file
    declares under ``variables``."""
    declared = data.get("variables") or {}
    for name, value in declared.items():
        if not re.fullmatch(r"[A-Za-z_]\w*", str(name)) or name in ("tweet", "label", "labels"):
            raise PromptError(
                f"{path}: 'variables': {name!r} must be a name (letters, digits, _) other "
                "than tweet, label and labels"
            )
        if not isinstance(value, str):
            raise PromptError(f"{path}: 'variables': {name!r} must be a text")
    for key in keys:
        own = PLACEHOLDERS[key]
        for match in PLACEHOLDER.finditer(str(data.get(key, ""))):
            name = match.group(2)
            if name is not None and name not in own and name not in declared:
                known = ", ".join("{" + n + "}" for n in (*own, *declared)) or "none"
                raise PromptError(
                    f"{path}: {key!r} has the placeholder {{{name}}}, which nothing fills "
                    f"(known there: {known}); declare it under 'variables', or write "
                    f"{{{{{name}}}}} for the text {{{name}}}"
                )


def fill(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each placeholder replaced by its value, in one pass (a value is
    never read for placeholders), and ``{{name}}`` written as ``{name}``."""

    def one(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            return "{" + match.group(1) + "}"
        return values.get(match.group(2), match.group(0))

    return PLACEHOLDER.sub(one, template)


def load_prompt_file(path: str | os.PathLike[str], family: str) -> PromptFile:
    """Read and check a prompt file of ``family`` (zero_shot, few_shot or finetuned; or
    zero_shot_text, few_shot_text: those families as plain text, see :func:`file_family`)."""
    if family not in FAMILY_KEYS:
        raise PromptError(f"unknown prompt family {family!r}")
    text = family.endswith("_text")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PromptError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PromptError(f"{path}: expected a mapping of settings")
    expected = FAMILY_KEYS[family]
    unknown = sorted(set(data) - set(expected))
    if unknown:
        raise PromptError(
            f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(expected)}"
        )
    for key, kind in expected.items():
        if key not in data:
            if key in OPTIONAL_KEYS.get(family, set()):
                continue
            raise PromptError(f"{path}: missing key {key!r}")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise PromptError(f"{path}: {key!r} must be a {getattr(kind, '__name__', kind)}")
    check_text_placeholders(data, path)
    for key in ("user", "template"):
        if key in data and "{tweet}" not in data[key]:
            raise PromptError(f"{path}: {key!r} must contain the placeholder {{tweet}}")
    if family == "few_shot" and "{label}" not in data["assistant"]:
        raise PromptError(f"{path}: 'assistant' must contain the placeholder {{label}}")
    if text and "{label}" not in data["answer"]:
        raise PromptError(f"{path}: 'answer' must contain the placeholder {{label}}")
    if family == "finetuned":
        bad = [t for t in data.get("label_map", {}).values() if t not in LABELS]
        unmapped = [
            lab
            for lab in data["labels"]
            if lab not in LABELS and lab not in data.get("label_map", {})
        ]
        if bad or unmapped:
            raise PromptError(
                f"{path}: every label must be one of {', '.join(LABELS)} or mapped to one "
                f"in label_map (problem with: {', '.join(bad + unmapped)})"
            )
    return PromptFile(family=family.removesuffix("_text"), path=str(path), settings=data, text=text)
