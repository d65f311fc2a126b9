"""Prompt families: a prompt file's variants, expanded, sampled and applied.

A zero- or few-shot prompt file may give, under ``variants``, alternative values per
axis; the file's own prompt is the value ``base`` of every axis. The axes:

- ``instruction``: the system prompt (chat) or the instruction (plain text);
  ``{labels}`` in it lists the verbalizer's words.
- ``verbalizer``: the words that name the seven classes, in the prompt and in the
  answer (one word per class, all different).
- ``format``: how a tweet and its answer are written (``user``/``assistant`` of a chat
  file, ``template``/``answer`` of a plain-text one); an answer starts with ``{label}``,
  where the scoring strategies read the label.
- ``seed`` and ``shot_order`` (few-shot): the shots' selection seed, and a seed that
  shuffles their order (``base``: as selected).
- ``calibration`` (the scoring strategies; its values come from the configuration):
  ``none``, ``contextual`` (Zhao et al. 2021) or ``batch`` (Zhou et al. 2024).

A family is the product of its axes, in the order above, the file's own prompt first;
or, with ``max_variants``, a seeded sample of that size that always keeps the file's
own prompt (as FormatSpread samples formats).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emoprompt.labels import LABELS
from emoprompt.prompting.prompt_file import (
    PromptError,
    PromptFile,
    check_text_placeholders,
    load_prompt_file,
)

BASE = "base"  # the value an axis takes in the file's own prompt
PROMPT_AXES = ("instruction", "verbalizer", "format", "seed", "shot_order")
AXES = (*PROMPT_AXES, "calibration")
CALIBRATIONS = ("none", "contextual", "batch")
#: The keys a ``format`` value may set, per prompt format.
FORMAT_KEYS = {"chat": ("user", "assistant"), "text": ("template", "answer")}
FEW_SHOT_AXES = ("seed", "shot_order")


@dataclass(frozen=True)
class Variant:
    """One member of a family: the value name it takes on each axis."""

    index: int  # its place in the whole product (0: the file's own prompt)
    values: tuple[tuple[str, str], ...]  # (axis, value name), in AXES order

    @property
    def id(self) -> str:
        return f"v{self.index:03d}"

    @property
    def params(self) -> dict[str, str]:
        return dict(self.values)

    @property
    def label(self) -> str:
        """The values that differ from the file's prompt (``base`` for none)."""
        changed = [f"{a}={v}" for a, v in self.values if v not in (BASE, "none")]
        return ", ".join(changed) or BASE

    @property
    def calibration(self) -> str:
        return self.params.get("calibration", "none")

    @property
    def prompt_key(self) -> tuple[tuple[str, str], ...]:
        """The values that change the prompt text (variants that share it share passes)."""
        return tuple((a, v) for a, v in self.values if a != "calibration")


def axis_values(prompt: PromptFile, axes: Sequence[str] = PROMPT_AXES) -> dict[str, dict[str, Any]]:
    """Each prompt axis's values by name, ``base`` (the file's own) first; an axis not
    among ``axes`` keeps its ``base`` value alone."""
    declared = prompt.settings.get("variants") or {}
    values = {}
    for axis in PROMPT_AXES:
        if axis in FEW_SHOT_AXES and prompt.family != "few_shot":
            continue
        values[axis] = {BASE: None, **((declared.get(axis) or {}) if axis in axes else {})}
    return values


def load_family(path: Any, family: str) -> PromptFile:
    """A prompt file (:func:`load_prompt_file`) with its ``variants`` checked."""
    prompt = load_prompt_file(path, family)
    check_variants(prompt.settings, path, family, prompt.text)
    return prompt


def check_variants(data: Mapping[str, Any], path: Any, family: str, text: bool) -> None:
    """A prompt file's ``variants`` mapping, checked: known axes, named values of the
    right kind; the message names the file and the axis."""
    variants = data.get("variants")
    if variants is None:
        return
    if not isinstance(variants, dict):
        raise PromptError(f"{path}: 'variants' must map an axis to its named values")
    allowed = PROMPT_AXES if family.startswith("few_shot") else PROMPT_AXES[:3]
    for axis, values in variants.items():
        where = f"{path}: 'variants.{axis}'"
        if axis not in allowed:
            raise PromptError(
                f"{path}: 'variants' has the unknown axis {axis!r}; known here: "
                f"{', '.join(allowed)} (calibration is set in the configuration)"
            )
        if not isinstance(values, dict) or not values:
            raise PromptError(f"{where} must map value names to values")
        for name, value in values.items():
            if not isinstance(name, str) or not name or name == BASE:
                raise PromptError(
                    f"{where}: {name!r} is not a value name ({BASE!r} is the file's own)"
                )
            _check_value(axis, value, f"{path}: 'variants.{axis}.{name}'", data, text)


def _check_value(axis: str, value: Any, where: str, data: Mapping[str, Any], text: bool):
    if axis in FEW_SHOT_AXES:
        if not isinstance(value, int) or isinstance(value, bool):
            raise PromptError(f"{where} must be a whole number (a seed)")
    elif axis == "instruction":
        if not isinstance(value, str):
            raise PromptError(f"{where} must be a text")
        key = "instruction" if text else "system"
        check_text_placeholders({**data, key: value}, where, keys=(key,))
    elif axis == "verbalizer":
        _check_verbalizer(value, where)
    else:  # format
        keys = FORMAT_KEYS["text" if text else "chat"]
        if not isinstance(value, dict) or not value or set(value) - set(keys):
            raise PromptError(f"{where} must set some of {', '.join(keys)} (texts)")
        check_text_placeholders({**data, **value}, where, keys=tuple(value))
        tweet_key, answer_key = keys
        if tweet_key in value and "{tweet}" not in value[tweet_key]:
            raise PromptError(f"{where}: {tweet_key!r} must contain the placeholder {{tweet}}")
        if answer_key in value and not value[answer_key].lstrip().startswith("{label}"):
            raise PromptError(
                f"{where}: {answer_key!r} must start with {{label}}: the scoring "
                "strategies read the label at the start of the answer"
            )


def _check_verbalizer(value: Any, where: str) -> None:
    if not isinstance(value, dict) or set(value) != set(LABELS):
        missing = sorted(set(LABELS) - set(value or {})) if isinstance(value, dict) else []
        extra = sorted(set(value or {}) - set(LABELS)) if isinstance(value, dict) else []
        raise PromptError(
            f"{where} must name each of the seven classes ({', '.join(LABELS)}) once"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(map(str, extra))}" if extra else "")
        )
    words = [value[label] for label in LABELS]
    if not all(isinstance(w, str) and w.strip() for w in words):
        raise PromptError(f"{where}: every class needs a word (a non-empty text)")
    if len({w.strip().lower() for w in words}) != len(words):
        raise PromptError(f"{where}: two classes share a word ({', '.join(words)})")


def expand(
    prompt: PromptFile,
    calibrations: Sequence[str] = ("none",),
    *,
    axes: Sequence[str] = PROMPT_AXES,
    max_variants: int | None = None,
    seed: int = 0,
) -> list[Variant]:
    """The family's variants: the product of the prompt file's values on ``axes`` and
    of ``calibrations`` (the file's prompt first), or a seeded sample of
    ``max_variants`` of them that keeps the file's prompt."""
    unknown = [c for c in calibrations if c not in CALIBRATIONS]
    if unknown or not calibrations:
        raise ValueError(f"calibrations must be some of {CALIBRATIONS}, not {list(calibrations)}")
    wrong = [a for a in axes if a not in PROMPT_AXES]
    if wrong:
        raise ValueError(f"unknown prompt axes {wrong}; known: {', '.join(PROMPT_AXES)}")
    values = {axis: list(named) for axis, named in axis_values(prompt, axes).items()}
    values["calibration"] = list(dict.fromkeys(calibrations))
    variants = [
        Variant(i, tuple(zip(values, combo, strict=True)))
        for i, combo in enumerate(itertools.product(*values.values()))
    ]
    if max_variants is None or max_variants >= len(variants):
        return variants
    if max_variants < 1:
        raise ValueError(f"max_variants must be at least 1, not {max_variants}")
    rest = random.Random(seed).sample(variants[1:], max_variants - 1)
    return sorted([variants[0], *rest], key=lambda v: v.index)


def apply(prompt: PromptFile, variant: Variant) -> PromptFile:
    """``prompt`` with the variant's values in place of the file's own."""
    axes = axis_values(prompt)
    settings = {k: v for k, v in prompt.settings.items() if k != "variants"}
    for axis, name in variant.prompt_key:
        if name == BASE:
            continue
        value = axes[axis][name]
        if axis == "instruction":
            settings["instruction" if prompt.text else "system"] = value
        elif axis == "verbalizer":
            words = [value[label] for label in LABELS]
            settings["labels"] = words
            settings["label_map"] = dict(zip(words, LABELS, strict=True))
        elif axis == "format":
            settings.update(value)
        else:  # seed, shot_order
            settings[axis] = value
    return dataclasses.replace(prompt, settings=settings)


def variant_record(variant: Variant) -> dict[str, Any]:
    """A variant as the records hold it."""
    return {"id": variant.id, "index": variant.index, "label": variant.label,
            "values": variant.params}  # fmt: skip
