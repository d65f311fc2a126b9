"""Every prompt measured against the model's context before any model work.

A prompt must leave room for its answer: the generation budget (``max_new_tokens``) for
generated answers, the longest label and the end of turn for scored ones. A tweet whose
prompt does not fit is cut to fit: its start is kept, the rest dropped, at a token
boundary, and the tweet is flagged (``truncated``). When the prompt does not fit even
with an empty tweet (too many shots, a long system prompt), the job stops at once with
a message that names the prompt file, the number of shots and the limit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pandas as pd

from emoprompt.evaluation.prompts import build_prompts
from emoprompt.evaluation.strategies import Settings, Strategy
from emoprompt.inference.tokens import TokenizerRules
from emoprompt.infra.errors import UserError
from emoprompt.prompting.prompt_file import PromptFile

log = logging.getLogger(__name__)

# Tokens kept free beyond the answer's own: a label is tokenised after the prompt, which
# can take one token more than the label alone.
SPARE_TOKENS = 2


class ContextError(UserError, ValueError):
    """A prompt cannot fit the model's context whatever its tweet."""


@dataclass(frozen=True)
class Fitted:
    """The sample with every tweet short enough for the context, and which were cut."""

    sample: pd.DataFrame
    truncated: list[bool]
    limit: int | None  # tokens a prompt may have (None: not measured here)
    longest: int | None  # tokens of the longest prompt, after cutting


def answer_reserve(strategy: Strategy, prompt: PromptFile, settings: Settings, rules) -> int:
    """Tokens kept free after the prompt for the answer."""
    if strategy.method == "generate":
        return settings.max_new_tokens + SPARE_TOKENS
    longest = max(len(ids) for ids in rules.encode(list(prompt.answers())))
    return longest + 1 + SPARE_TOKENS  # the end-of-turn token after the label


def fit_to_context(
    strategy: Strategy,
    prompt: PromptFile,
    tokenizer: Any,
    train: pd.DataFrame,
    sample: pd.DataFrame,
    settings: Settings,
    context: int,
) -> Fitted:
    """Measure every prompt in tokens and cut the tweets of those that do not fit."""
    rules = TokenizerRules(tokenizer)
    limit = context - answer_reserve(strategy, prompt, settings, rules)
    kwargs = settings.chat_template_kwargs

    def length(frame: pd.DataFrame) -> list[int]:
        parts, _ = build_prompts(strategy, prompt, tokenizer, train, frame, kwargs)
        return [len(rules.encode_prompt(p.text)) for p in parts]

    empty = length(sample.iloc[:1].assign(tweet=""))[0]
    if empty > limit:
        raise ContextError(_too_long(prompt, empty, context, limit))
    lengths = length(sample)
    sample = sample.reset_index(drop=True).copy()
    truncated = [False] * len(sample)
    for i in [i for i, n in enumerate(lengths) if n > limit]:
        row = sample.iloc[[i]]
        without = length(row.assign(tweet=""))[0]  # per-tweet shots: its own fixed part
        if without > limit:
            raise ContextError(_too_long(prompt, without, context, limit))
        sample.at[i, "tweet"], lengths[i] = _cut(row, limit - without, limit, rules, length)
        truncated[i] = True
    if any(truncated):
        cut = [str(i) for i, flag in zip(sample["id"], truncated, strict=True) if flag]
        log.warning(
            "%d of %d tweets cut to fit the context of %d tokens: %s",
            len(cut),
            len(sample),
            context,
            ", ".join(cut[:10]),
        )
    return Fitted(sample, truncated, limit, max(lengths, default=0))


def _cut(
    row: pd.DataFrame, keep: int, limit: int, rules: TokenizerRules, length
) -> tuple[str, int]:
    """The tweet of a one-row frame, cut at a token boundary (``keep`` tokens first)
    until its prompt fits ``limit``."""
    ids = rules.encode([str(row["tweet"].iloc[0])])[0]
    while True:
        text = rules.tokenizer.decode(ids[:keep]).rstrip()
        n = length(row.assign(tweet=text))[0]
        if n <= limit or keep == 0:
            return text, n
        keep = max(0, keep - (n - limit))


def _too_long(prompt: PromptFile, tokens: int, context: int, limit: int) -> str:
    shots = prompt.settings.get("shots")
    what = f" with {shots} shots" if shots is not None else ""
    return (
        f"{prompt.path}: the prompt{what} takes {tokens:,} tokens before any tweet, more than "
        f"the {limit:,} the model's context of {context:,} leaves beside the answer"
        + ("; lower 'shots'" if shots is not None else "; shorten the prompt")
    )


def unmeasured(sample: pd.DataFrame) -> Fitted:
    """The sample as it is, for a server that measures prompts itself (a hosted chat API
    without a local tokenizer): nothing cut, no limit known."""
    sample = sample.reset_index(drop=True).copy()
    return Fitted(sample, [False] * len(sample), limit=None, longest=None)


def truncation_record(fitted: Fitted, context: int | None) -> dict[str, Any]:
    """What the prediction JSON says of it."""
    return {
        "context_tokens": context,
        "prompt_token_limit": fitted.limit,
        "longest_prompt_tokens": fitted.longest,
        "truncated": int(sum(fitted.truncated)),
        "truncated_ids": [
            str(i) for i, cut in zip(fitted.sample["id"], fitted.truncated, strict=True) if cut
        ],
    }
