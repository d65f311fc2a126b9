"""The ``finetune:`` settings of config.yaml, checked, and what defines an adapter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

LABEL_SETS = ("seven", "notebook")
SUBSETS = ("stratified", "balanced")
CLASS_WEIGHTS = ("none", "sqrt", "balanced")
PROMPT_FORMATS = ("plain", "chat")
LOSSES = ("answer", "labels")
AUTOCASTS = ("auto", "bfloat16", "none")
ALL_LINEAR = "all-linear"
# Settings that say when to checkpoint and how many threads, not what is trained.
RUN_SETTINGS = ("checkpoint_minutes", "checkpoint_steps", "threads")


@dataclass
class FinetuneSettings:
    """The ``finetune:`` block of config.yaml (see the schema for each key's meaning)."""

    label_set: str = "seven"
    prompt_format: str = "plain"
    train_size: int | str = 1600
    subset: str = "balanced"
    class_weights: str = "none"
    loss: str = "labels"  # answer: every answer token; labels: a softmax over the answers
    epochs: float = 2.0
    max_steps: int | None = None
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str | list[str] = ALL_LINEAR
    lora_layers: int | str = 10  # or N: the adapter on the top N decoder layers only
    batch_size: int = 16
    gradient_accumulation: int = 1
    max_length: int = 128
    seed: int = 0
    quantization: str = "auto"  # auto: nf4 on CUDA with bitsandbytes, else none
    autocast: str = "auto"  # auto | bfloat16 | none: the matrix products of the steps
    gradient_checkpointing: bool = False
    frozen_states: str = "auto"  # auto: the frozen bottom layers computed once, where proven
    checkpoint_minutes: float = 2.0
    checkpoint_steps: int | None = None  # also every N steps (tests)
    threads: int | str = "auto"  # torch CPU threads; auto: the job's

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> FinetuneSettings:
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown fine-tuning setting(s): {', '.join(unknown)}")
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        for name, allowed in (
            ("label_set", LABEL_SETS),
            ("subset", SUBSETS),
            ("class_weights", CLASS_WEIGHTS),
            ("prompt_format", PROMPT_FORMATS),
            ("loss", LOSSES),
            ("quantization", ("auto", "none", "nf4")),
            ("autocast", AUTOCASTS),
            ("frozen_states", ("auto", "off")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"finetune {name} must be one of {', '.join(allowed)}")
        if self.train_size != "all" and (
            not isinstance(self.train_size, int) or self.train_size < 1
        ):
            raise ValueError("finetune train_size must be 'all' or a positive integer")
        if self.lora_layers != "all" and (
            not isinstance(self.lora_layers, int) or self.lora_layers < 1
        ):
            raise ValueError("finetune lora_layers must be 'all' or a positive integer")
        if self.batch_size < 1 or self.gradient_accumulation < 1 or self.max_length < 8:
            raise ValueError(
                "finetune batch_size, gradient_accumulation must be >= 1, max_length >= 8"
            )

    def fingerprint(self) -> dict[str, Any]:
        """What defines the trained adapter (checkpoint timing does not)."""
        values = asdict(self)
        for name in RUN_SETTINGS:
            values.pop(name)
        return values
