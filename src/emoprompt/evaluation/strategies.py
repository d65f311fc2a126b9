"""The strategies: each one (prompt family, method) pair, and the settings they run with.

The five of the course notebook are zero/few-shot x generate/first-token and the
fine-tuned model's first token; whole-label likelihood and a TF-IDF baseline are added
beside them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from emoprompt.models.catalogue import SERVED_REFUSALS
from emoprompt.prompting.prompt_file import TEXT_FAMILIES, prompt_format


@dataclass(frozen=True)
class Strategy:
    name: str
    family: str | None  # prompt family; None for the baseline and the probe
    method: str  # generate | first_token | label_likelihood | tfidf | probe

    @property
    def prompt_format(self) -> str | None:
        """Which kind of model the strategy is for: a chat model, or a plain-prompt one.

        The probe reads the tweet alone, without a prompt; it runs for the catalogue's
        chat models (not for a fine-tuned entry, whose base it would probe again)."""
        if self.method == "probe":
            return "chat"
        if self.family is None:
            return None
        return prompt_format(self.family)

    def fits(self, model_format: str) -> bool:
        """Whether a model with this catalogue ``prompt_format`` runs the strategy: a base
        model (``text``) runs the chat models' zero/few-shot strategies and the probe,
        through plain-text prompt files."""
        if model_format == "text":
            return self.method == "probe" or self.family in TEXT_FAMILIES
        return self.prompt_format == model_format


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("zero_shot_generate", "zero_shot", "generate"),
        Strategy("zero_shot_first_token", "zero_shot", "first_token"),
        Strategy("few_shot_generate", "few_shot", "generate"),
        Strategy("few_shot_first_token", "few_shot", "first_token"),
        Strategy("finetuned_first_token", "finetuned", "first_token"),
        Strategy("zero_shot_label_likelihood", "zero_shot", "label_likelihood"),
        Strategy("few_shot_label_likelihood", "few_shot", "label_likelihood"),
        Strategy("finetuned_label_likelihood", "finetuned", "label_likelihood"),
        Strategy("linear_probe", None, "probe"),
        Strategy("baseline_tfidf", None, "tfidf"),
    )
}
BASELINE_MODEL = "baseline"


def strategies_for(
    prompt_format: str,
    names: Sequence[str],
    *,
    served: str | None = None,
    refused: Iterable[str] = (),
) -> list[str]:
    """The strategies among ``names`` that apply to a model with this prompt format and
    none of whose methods are ``refused`` (a catalogue entry's ``refused_methods``).

    ``served`` names the API of a model behind a server (``completions`` or ``chat``),
    whose refusals are the catalogue's :data:`SERVED_REFUSALS`."""
    if served is not None and served not in SERVED_REFUSALS:
        raise ValueError(f"served must be one of {sorted(SERVED_REFUSALS)} or None, not {served!r}")
    skip = set(refused) | set(SERVED_REFUSALS.get(served, ()))
    return [
        n for n in names if STRATEGIES[n].fits(prompt_format) and STRATEGIES[n].method not in skip
    ]


@dataclass
class Settings:
    """How a strategy runs (from config): decoding, scoring and answer parsing."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    fallback_label: str = "Otras"
    length_normalize: bool = False
    calibrate: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
