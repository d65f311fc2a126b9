"""What every way of running a model offers the prompting strategies.

A :class:`Backend` answers the three questions the strategies ask (in the spirit of
lm-evaluation-harness's ``LM``):

* :meth:`Backend.first_token_probs` - next-token probabilities of each label's first
  token after each prompt, renormalised over the labels;
* :meth:`Backend.label_logprobs` - log-likelihood of each label's whole token sequence
  (plus an end token) as the answer;
* :meth:`Backend.generate` - the answer, greedy or sampled;

and :meth:`Backend.describe` says what it is and which speed-ups it uses (written into
each prediction record). Strategies (:mod:`emoprompt.evaluation.runner`) talk to a
backend only. The implementations: :class:`emoprompt.inference.engine.Engine` (batched,
with the speed-ups its capability table allows) and
:class:`emoprompt.inference.reference.ReferenceBackend` (one plain forward pass per
prompt and label, transformers' own ``generate``), which tests and ``make bench``
compare the engine against.
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emoprompt.inference.tokens import TokenizerRules
from emoprompt.prompting.render import PromptParts

#: ``end_token`` default of :meth:`Backend.label_logprobs`: the tokenizer's end-of-turn token.
END_OF_TURN = "<end-of-turn>"


@dataclass(frozen=True)
class Generation:
    """One generated answer.

    ``tokens_in`` is the prompt's length in tokens (prefix + suffix), ``tokens_out`` the
    number of tokens generated, the stopping token (EOS, end of turn, newline) included.
    """

    text: str
    tokens_in: int
    tokens_out: int


@dataclass(frozen=True)
class Decoding:
    """How :meth:`Backend.generate` decodes."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    stop_at_newline: bool = False

    def __post_init__(self) -> None:
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be positive when sampling")


def new_stats() -> Counter:
    """The counters every backend keeps (``Backend.stats``)."""
    return Counter(
        prompts=0, tokens_in=0, tokens_out=0, label_tokens=0, forward_passes=0, fallbacks=0
    )


def answer(
    rules: TokenizerRules, stop_ids: set[int], tokens: list[int], n_prompt: int, decoding: Decoding
) -> Generation:
    """A :class:`Generation` from the generated ``tokens`` (a trailing stop token is not
    part of the text; with ``stop_at_newline`` the text ends before its first newline)."""
    body = tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens
    text = rules.tokenizer.decode(body, skip_special_tokens=True)
    if decoding.stop_at_newline:
        text = text.split("\n", 1)[0]
    return Generation(text=text, tokens_in=n_prompt, tokens_out=len(tokens))


def until_stop(
    rules: TokenizerRules, stop_ids: set[int], tokens: list[int], stop_at_newline: bool
) -> list[int]:
    """The generated ``tokens`` up to the first stop token (included): a batch pads its
    finished rows, and with ``stop_at_newline`` a newline token ends the answer too."""
    for k, token in enumerate(tokens):
        if token in stop_ids or (stop_at_newline and rules.is_newline(token)):
            return tokens[: k + 1]
    return tokens


class Backend(abc.ABC):
    """A model the strategies can score and generate with (see the module docstring).

    Prompts are :class:`PromptParts` (a shared ``prefix`` and a per-tweet ``suffix``);
    a backend may use the split or only the whole ``text``, never anything else.
    """

    stats: Counter

    @abc.abstractmethod
    def label_first_tokens(self, labels: Sequence[str], context: str) -> list[int]:
        """The first token of each label as the tokenizer writes it right after ``context``."""

    @abc.abstractmethod
    def first_token_probs(
        self, prompts: Sequence[PromptParts], labels: Sequence[str]
    ) -> np.ndarray:
        """(n_prompts, n_labels): each label's first-token probability, renormalised over
        the labels; rows sum to 1."""

    @abc.abstractmethod
    def label_logprobs(
        self,
        prompts: Sequence[PromptParts],
        labels: Sequence[str],
        *,
        end_token: str | None = END_OF_TURN,
        normalize: bool = False,
    ) -> np.ndarray:
        """(n_prompts, n_labels): log-likelihood of each label's tokens (then
        ``end_token``) as the answer; ``normalize`` divides by the tokens scored."""

    @abc.abstractmethod
    def generate(
        self,
        prompts: Sequence[PromptParts],
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
        stop_at_newline: bool = False,
    ) -> list[Generation]:
        """Each prompt's answer, decoded without special tokens."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What this backend is and how it computes (JSON-safe): ``backend`` (its kind),
        ``device``, ``dtype``, ``speedups`` (those in use) and what else it knows."""
