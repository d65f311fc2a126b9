"""Rendering a prompt: one tweet (and its shots) through a prompt file into text.

A prompt is rendered as two parts: the ``prefix`` that every tweet of a run shares
(system prompt and few-shot turns, through the model's chat template) and the
tweet's own ``suffix``, which ends exactly where the answer begins. The engine
computes the prefix once and reuses it for every tweet. :func:`render` is the one way
evaluation, fine-tuning and inspection write a prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from emoprompt.prompting.prompt_file import PromptFile, fill

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptParts:
    """A prompt split into the part shared by many tweets and the tweet's own part."""

    prefix: str  # shared text (system prompt + few-shot turns); may be ""
    suffix: str  # the tweet's own part, ending exactly where the answer begins
    # The chat turns the text was rendered from (chat prompts only): what a server's
    # chat-completions API is sent instead of the text.
    messages: tuple[Mapping[str, str], ...] | None = field(default=None, compare=False)

    @property
    def text(self) -> str:
        return self.prefix + self.suffix


def _fill(prompt: PromptFile, key: str, **values: str) -> str:
    """A text key of the prompt file with its placeholders filled: ``values`` and the
    file's own ``variables`` (not str.format: tweets and prompts may hold braces)."""
    template = prompt.settings.get(key, "{label}" if key == "assistant" else "")
    return fill(template, prompt.values(**values))


def chat_messages(
    prompt: PromptFile, tweet: str, shots: Sequence[tuple[str, str]] = ()
) -> list[dict[str, str]]:
    """System prompt, the solved examples as earlier turns, then the tweet."""
    messages = [{"role": "system", "content": _fill(prompt, "system")}]
    for shot_tweet, shot_label in shots:
        messages.append({"role": "user", "content": _fill(prompt, "user", tweet=shot_tweet)})
        answer = _fill(prompt, "assistant", label=prompt.word(shot_label))
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": _fill(prompt, "user", tweet=tweet)})
    return messages


def render_chat(
    tokenizer: Any, messages: list[dict[str, str]], template_kwargs: Mapping[str, Any] | None = None
) -> PromptParts:
    """Apply the model's chat template; split off everything before the last user turn.

    The prefix is the template rendered on the earlier messages alone. Where the
    template does not render them as a prefix of the whole (some templates do not), the
    whole prompt becomes the suffix and nothing is shared. Without a tokenizer (a hosted
    chat API, whose template is the server's) the text is only a transcript of the
    turns, for the records, and the messages are what is sent.
    """
    turns = tuple(messages)
    if tokenizer is None:
        return PromptParts("", transcript(messages), turns)
    kwargs = dict(template_kwargs or {})
    full = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    head = tokenizer.apply_chat_template(messages[:-1], tokenize=False, **kwargs)
    if full.startswith(head):
        return PromptParts(prefix=head, suffix=full[len(head) :], messages=turns)
    log.warning("chat template does not render a shared prefix; prompts are not shared")
    return PromptParts(prefix="", suffix=full, messages=turns)


def transcript(messages: Sequence[Mapping[str, str]]) -> str:
    """The turns as plain text (``role: content``), a prompt's record where no chat
    template renders it."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def render_text(
    prompt: PromptFile, tweet: str, shots: Sequence[tuple[str, str]] = ()
) -> PromptParts:
    """A base model's plain-text prompt: the instruction, each shot as a solved block
    (``template`` then ``answer``), then the tweet's block, open where the answer goes.
    Everything before the tweet is shared."""
    marker = "\x00tweet\x00"  # cannot come from a YAML prompt file
    blocks = [_fill(prompt, "instruction")]
    for shot_tweet, shot_label in shots:
        blocks.append(_fill(prompt, "template", tweet=shot_tweet) + _answer(prompt, shot_label))
    blocks.append(_fill(prompt, "template", tweet=marker))
    head, _, tail = "\n\n".join(blocks).partition(marker)
    # The space before the tweet goes with it: tokenizers write it into the tweet's
    # first token (SentencePiece's "▁word"), so a prefix ending in it would not split
    # at a token boundary.
    shared = head.rstrip(" ")
    return PromptParts(prefix=shared, suffix=head[len(shared) :] + tweet + tail)


def _answer(prompt: PromptFile, label: str) -> str:
    return prompt.answers((prompt.word(label),))[0]


def render_plain(prompt: PromptFile, tweet: str) -> PromptParts:
    """The fine-tuned model's plain prompt: the part before {tweet} is shared."""
    marker = "\x00tweet\x00"  # cannot come from a YAML prompt file
    head, _, tail = _fill(prompt, "template", tweet=marker).partition(marker)
    return PromptParts(prefix=head, suffix=tweet + tail)


def prompt_sha256(payload: Any) -> str:
    """A stable digest of prompt messages or text (sorted-key JSON, UTF-8)."""
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def render(
    prompt: PromptFile,
    tweet: str,
    tokenizer: Any = None,
    *,
    shots: Sequence[tuple[str, str]] = (),
    template_kwargs: Mapping[str, Any] | None = None,
) -> PromptParts:
    """The prompt for ``tweet``: the plain template of a fine-tuned prompt file, a base
    model's plain text (with ``shots`` as solved blocks), or the chat messages (with
    ``shots`` as earlier turns) through the tokenizer's template."""
    if prompt.format == "plain":
        return render_plain(prompt, tweet)
    if prompt.format == "text":
        return render_text(prompt, tweet, shots)
    return render_chat(tokenizer, chat_messages(prompt, tweet, shots), template_kwargs)


def prompt_record(prompt: PromptFile, shots: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """What was asked, for the records: the template, or the messages with ``{tweet}``."""
    if prompt.format == "plain":
        return {"template": prompt.settings["template"]}
    if prompt.format == "text":
        return {"text": render_text(prompt, "{tweet}", shots).text}
    return {"messages": chat_messages(prompt, "{tweet}", shots)}
