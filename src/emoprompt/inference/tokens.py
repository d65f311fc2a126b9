"""The tokenizer rules that evaluation and training share, in one place.

* Prompts are encoded with ``add_special_tokens=False``: chat templates already write
  the BOS text (``<|begin_of_text|>``...), so letting the tokenizer add one would double
  it. Only when the tokenizer adds a BOS by default *and* the prompt does not start with
  one (plain, non-chat prompts) is a BOS put in front (:meth:`TokenizerRules.encode_prompt`).
* Labels (answers) are tokenised the way the tokenizer writes them *after the prompt*:
  the tokens of ``prompt + label`` that follow the prompt's tokens, so a leading-space
  variant is used exactly when the tokenizer would produce it. A prompt whose last token
  would merge with the label (e.g. one ending in a space) is refused.
* An answer ends with the chat template's end-of-turn token (``<|eot_id|>``,
  ``<|im_end|>``), else EOS: what label-likelihood scoring puts after each label and
  what fine-tuning trains the model to write after its answer.

The engine scores with these rules and :mod:`emoprompt.training.dataset` builds its
training examples with them, so a fine-tuned model is evaluated on exactly the tokens it
was trained on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

from emoprompt.infra.errors import UserError

log = logging.getLogger(__name__)

# A marker no template writes: where an assistant answer goes in a rendered chat.
_ANSWER_MARKER = "\u2042EMOPROMPT_ANSWER\u2042"


class LabelCollisionError(UserError, ValueError):
    """Two labels start with the same token, so first-token scores cannot tell them apart."""


class TokenizerRules:
    """How prompts, labels and the end of an answer are tokenised for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos: list[int] = self._bos_to_add()
        self.end_of_turn_id: int | None = self._find_end_of_turn()
        specials = sorted(
            {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()},
            key=len,
            reverse=True,
        )
        self._special_re = (
            re.compile("|".join(re.escape(s) for s in specials if s)) if specials else None
        )
        self._tail_ok: bool | None = None  # verified once: labels tokenised after the tail
        self._newline_ids: dict[int, bool] = {}

    # ------------------------------------------------------------------ prompts
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def with_bos(self, ids: list[int]) -> list[int]:
        """``ids`` with the tokenizer's default BOS in front, unless they start with it."""
        if self.bos and (not ids or ids[0] != self.bos[0]):
            return self.bos + ids
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """A whole prompt's token ids, as the model sees them."""
        return self.with_bos(self.encode([text])[0])

    def _bos_to_add(self) -> list[int]:
        """``[bos]`` if the tokenizer adds a BOS by default, else ``[]``."""
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return []
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        default = self.tokenizer("a")["input_ids"]
        return [bos] if len(default) > len(plain) and default[0] == bos else []

    # ------------------------------------------------------------------ answer ends
    def _find_end_of_turn(self) -> int | None:
        """The token that closes an assistant turn in the chat template, else EOS."""
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(
                    [
                        {"role": "user", "content": "x"},
                        {"role": "assistant", "content": _ANSWER_MARKER},
                    ],
                    tokenize=False,
                )
            except Exception:  # a template that refuses this chat: use EOS
                text = ""
            if _ANSWER_MARKER in text:
                after = text.split(_ANSWER_MARKER, 1)[1]
                ids = self.encode([after])[0] if after.strip() else []
                if ids:
                    return int(ids[0])
        eos = self.tokenizer.eos_token_id
        return None if eos is None else int(eos)

    def answer_end_id(self) -> int:
        """:attr:`end_of_turn_id`, or a clear error for a tokenizer that has none."""
        if self.end_of_turn_id is None:
            raise ValueError("the tokenizer has no end-of-turn or EOS token")
        return self.end_of_turn_id

    def end_ids(self, end_token: str | None, end_of_turn: str) -> list[int]:
        """The tokens scored after each label: the end-of-turn token when ``end_token`` is
        ``end_of_turn`` (the backends' default marker), the token(s) ``end_token`` names,
        or none for ``None``."""
        if end_token == end_of_turn:
            if self.end_of_turn_id is None:
                raise ValueError("the tokenizer has no end-of-turn or EOS token; pass end_token")
            return [self.end_of_turn_id]
        return self.token_id(end_token) if end_token is not None else []

    def stop_ids(self, generation_eos: int | Iterable[int] | None = None) -> set[int]:
        """Tokens that end a generated answer: EOS, end of turn, and the model's own."""
        candidates = [self.tokenizer.eos_token_id, self.end_of_turn_id]
        if isinstance(generation_eos, list | tuple | set):
            candidates += list(generation_eos)
        else:
            candidates.append(generation_eos)
        return {int(token) for token in candidates if token is not None}

    def token_id(self, token: str) -> list[int]:
        """The id(s) of a token given as text (a special token's name or plain text)."""
        vocab = self.tokenizer.get_vocab()
        if token in vocab:
            return [vocab[token]]
        ids = self.encode([token])[0]
        if not ids:
            raise ValueError(f"end token {token!r} encodes to no tokens")
        return ids

    def is_newline(self, token: int) -> bool:
        if token not in self._newline_ids:
            self._newline_ids[token] = "\n" in self.tokenizer.decode([token])
        return self._newline_ids[token]

    # ------------------------------------------------------------------ labels
    def _label_tail(self, context: str) -> str:
        """The part of ``context`` after (and including) its last added/special token.

        Fast tokenizers split the text at added tokens before anything else, so the
        tokens of ``context + label`` after those of ``context`` only depend on it.
        """
        if self._special_re is None:
            return context
        last = None
        for last in self._special_re.finditer(context):  # noqa: B007 - want the last one
            pass
        return context[last.start() :] if last is not None else context

    def label_seqs(self, contexts: Sequence[str], labels: Sequence[str]) -> list[list[list[int]]]:
        """For each context, each label's tokens as written after that context."""
        if not labels:
            raise ValueError("no labels given")
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate labels: {list(labels)}")
        if self._tail_ok is None and contexts:
            self._tail_ok = True
            full = self.label_seqs_of([contexts[0]], labels)
            self._tail_ok = self.label_seqs_of([self._label_tail(contexts[0])], labels) == full
            if not self._tail_ok:
                log.info("labels are tokenised after the whole prompt (tail shortcut differs)")
        keys = [self._label_tail(c) if self._tail_ok else c for c in contexts]
        distinct = list(dict.fromkeys(keys))
        table = dict(zip(distinct, self.label_seqs_of(distinct, labels), strict=True))
        return [table[k] for k in keys]

    def label_seqs_of(self, contexts: list[str], labels: Sequence[str]) -> list[list[list[int]]]:
        """Like :meth:`label_seqs`, each context encoded whole (no shortcut)."""
        texts = []
        for context in contexts:
            texts.append(context)
            texts.extend(context + label for label in labels)
        encoded = self.encode(texts)
        out = []
        step = len(labels) + 1
        for c, context in enumerate(contexts):
            ctx = encoded[c * step]
            seqs = []
            for j, label in enumerate(labels):
                ids = encoded[c * step + 1 + j]
                if ids[: len(ctx)] != ctx:
                    raise ValueError(
                        f"the prompt's last token merges with label {label!r} "
                        f"(prompt ends with {context[-20:]!r}): the prompt must end at a token "
                        "boundary, e.g. without trailing whitespace"
                    )
                if len(ids) == len(ctx):
                    raise ValueError(f"label {label!r} encodes to no tokens")
                seqs.append(ids[len(ctx) :])
            out.append(seqs)
        return out

    def label_tokens(self, labels: Sequence[str], context: str) -> list[list[int]]:
        """Each label's tokens as the tokenizer writes them right after ``context``."""
        return self.label_seqs_of([context], labels)[0]

    def check_collisions(self, labels: Sequence[str], firsts: Sequence[int]) -> None:
        """Refuse labels whose first tokens (``firsts``) are not all different."""
        seen: dict[int, str] = {}
        for label, token in zip(labels, firsts, strict=True):
            if token in seen:
                name = self.tokenizer.convert_ids_to_tokens(token)
                raise LabelCollisionError(
                    f"labels {seen[token]!r} and {label!r} both start with token {name!r} "
                    f"(id {token}), so first-token scores cannot tell them apart; "
                    "use the label-likelihood strategy (label_logprobs) instead"
                )
            seen[token] = label

    def label_first_tokens(self, labels: Sequence[str], context: str) -> list[int]:
        """The first token of each label as the tokenizer writes it right after ``context``.

        Raises :class:`LabelCollisionError` if two labels share their first token.
        """
        firsts = [seq[0] for seq in self.label_tokens(labels, context)]
        self.check_collisions(labels, firsts)
        return firsts

    def answer_tokens(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids + end of turn): a training example's two parts, the
        prompt as :meth:`encode_prompt` writes it and the answer as scored after it."""
        return self.encode_prompt(prompt), [
            *self.label_tokens([answer], prompt)[0],
            self.answer_end_id(),
        ]
