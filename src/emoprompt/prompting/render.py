"""Prompt files (what the user edits) and the prompts built from them.

A prompt is rendered as two parts: the ``prefix`` that every tweet of a run shares
(system prompt and few-shot turns, through the model's chat template) and the
tweet's own ``suffix``, which ends exactly where the answer begins. The engine
computes the prefix once and reuses it for every tweet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emoprompt.labels import LABELS

log = logging.getLogger(__name__)

FAMILY_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "zero_shot": {"system": str, "user": str},
    "few_shot": {
        "system": str,
        "user": str,
        "assistant": str,
        "shots": int,
        "selection": str,
        "seed": int,
        "manual_ids": list,
    },
    "finetuned": {"template": str, "labels": list, "label_map": dict},
}
OPTIONAL_KEYS = {"few_shot": {"manual_ids", "seed"}, "finetuned": {"label_map"}}


class PromptError(ValueError):
    """A prompt file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class PromptParts:
    """A prompt split into the part shared by many tweets and the tweet's own part."""

    prefix: str  # shared text (system prompt + few-shot turns); may be ""
    suffix: str  # the tweet's own part, ending exactly where the answer begins

    @property
    def text(self) -> str:
        return self.prefix + self.suffix


@dataclass(frozen=True)
class PromptFile:
    """A validated prompt file of one strategy family."""

    family: str
    path: str
    settings: Mapping[str, Any] = field(default_factory=dict)

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


def load_prompt_file(path: str | os.PathLike[str], family: str) -> PromptFile:
    """Read and check a prompt file of ``family`` (zero_shot, few_shot or finetuned)."""
    if family not in FAMILY_KEYS:
        raise PromptError(f"unknown prompt family {family!r}")
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
    for key in ("user", "template"):
        if key in data and "{tweet}" not in data[key]:
            raise PromptError(f"{path}: {key!r} must contain the placeholder {{tweet}}")
    if family == "few_shot" and "{label}" not in data["assistant"]:
        raise PromptError(f"{path}: 'assistant' must contain the placeholder {{label}}")
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
    return PromptFile(family=family, path=str(path), settings=data)


def _fill(template: str, **values: str) -> str:
    # str.replace, not str.format: tweets and prompts may contain braces.
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def chat_messages(
    prompt: PromptFile, tweet: str, shots: Sequence[tuple[str, str]] = ()
) -> list[dict[str, str]]:
    """System prompt, the solved examples as earlier turns, then the tweet."""
    settings = prompt.settings
    messages = [{"role": "system", "content": settings["system"]}]
    for shot_tweet, shot_label in shots:
        messages.append({"role": "user", "content": _fill(settings["user"], tweet=shot_tweet)})
        answer = _fill(settings.get("assistant", "{label}"), label=shot_label)
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": _fill(settings["user"], tweet=tweet)})
    return messages


def render_chat(
    tokenizer: Any, messages: list[dict[str, str]], template_kwargs: Mapping[str, Any] | None = None
) -> PromptParts:
    """Apply the model's chat template; split off everything before the last user turn.

    The prefix is the template rendered on the earlier messages alone. Where the
    template does not render them as a prefix of the whole (some templates do not), the
    whole prompt becomes the suffix and nothing is shared.
    """
    kwargs = dict(template_kwargs or {})
    full = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    head = tokenizer.apply_chat_template(messages[:-1], tokenize=False, **kwargs)
    if full.startswith(head):
        return PromptParts(prefix=head, suffix=full[len(head) :])
    log.warning("chat template does not render a shared prefix; prompts are not shared")
    return PromptParts(prefix="", suffix=full)


def render_plain(prompt: PromptFile, tweet: str) -> PromptParts:
    """The fine-tuned model's plain prompt: the part before {tweet} is shared."""
    head, _, tail = prompt.settings["template"].partition("{tweet}")
    return PromptParts(prefix=head, suffix=tweet + tail)


def prompt_sha256(payload: Any) -> str:
    """A stable digest of prompt messages or text (sorted-key JSON, UTF-8)."""
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
