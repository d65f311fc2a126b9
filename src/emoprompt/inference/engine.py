"""The inference engine behind every prompting strategy.

One small interface over any Hugging Face causal LM (model and tokenizer already
loaded by the caller):

* :meth:`Engine.first_token_probs` - next-token probabilities of each label's first
  token, renormalised over the labels (one forward pass per batch, last position only);
* :meth:`Engine.label_logprobs` - log-likelihood of each label's whole token sequence
  (plus the end-of-turn token) as the answer;
* :meth:`Engine.generate` - batched greedy decoding (or seeded sampling).

Speed comes from reusing the KV cache of the text that many prompts share
(:attr:`PromptParts.prefix`: the system prompt and the few-shot turns): it is encoded
once per call, and every batch feeds only the per-tweet suffixes on top of it. On a
CPU with SDPA attention a batch keeps one copy of a long prefix (at least
``SHARED_PREFIX_MIN_RATIO`` times the suffixes) for all its rows and attends to it once
for all of them (:mod:`emoprompt.inference.attention`); otherwise each row gets a broadcast view
of it. Passes that need the last position's logits only skip the rest of the last
layer's work, and first-token scores compute only the label tokens' logits
(:mod:`emoprompt.inference.last_position`). On a CPU, float32 linear layers compute through
oneDNN with weights packed once per engine (:mod:`emoprompt.inference.packed_linear`). Each of
these two is checked once per model against the plain forward pass before it is used.
Left-padded suffixes after a shared prefix leave pad gaps in the middle of each row;
the attention mask ``[prefix ones | suffix mask]`` and explicit ``position_ids``
(counting real tokens only) make every row compute exactly what it would alone.

Tokenisation. Prompts are encoded with ``add_special_tokens=False``: chat templates
already write the BOS text (``<|begin_of_text|>``...), so letting the tokenizer add
one would double it. Only when the tokenizer adds a BOS by default *and* the prompt
does not start with one (plain, non-chat prompts) is a BOS put in front - of the
prefix, or of the whole prompt, never of a suffix. A prefix is used only for prompts
where ``tokenize(prefix) + tokenize(suffix) == tokenize(prefix + suffix)``; any other
prompt falls back to its full text (logged as a WARNING, counted in
``stats["fallbacks"]``), so the split never changes the result.

Labels are tokenised the way the tokenizer writes them *after the prompt*: the tokens
of ``prompt + label`` that follow the prompt's tokens (so a leading-space variant is
used exactly when the tokenizer would produce it). A prompt whose last token would
merge with the label (e.g. one ending in a space) is refused.

Besides the declared prefix, the tokens that all prompts of a group start with (the
user-turn header, or the system prompt of prompts that fell back) are cached too.
Batches are runs of the prompts sorted by length, split so as to minimise padded
tokens plus a per-pass cost. Label likelihoods score all labels of a batch in one
extra pass: the labels are laid side by side after each prompt, with a 4D attention
mask that lets each label see only the prompt and itself (models with sliding-window
layers or attention kernels without custom masks get one pass per label instead).

Notes on transformers 5 (5.24): the cache argument and output field are ``cache``
(``past_key_values`` is a deprecated alias until 5.40); a ``DynamicCache`` is a list
of ``DynamicLayer`` objects holding ``keys``/``values`` that ``update`` replaces by
concatenation (never writes in place), which is what lets a batch start from a
broadcast view of the one-row prefix cache; a 4D ``attention_mask`` is passed to the
attention function as is; ``logits_to_keep`` limits the LM head to the last positions.

Prompts may be :class:`emoprompt.prompting.render.PromptParts` or any object with ``prefix`` and
``suffix`` strings.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import re
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from emoprompt.inference.agreement import logits_agree
from emoprompt.inference.attention import IMPLEMENTATION as SHARED_PREFIX_ATTENTION
from emoprompt.inference.attention import SharedPrefixLayer, shared_prefix
from emoprompt.inference.attention import register as register_attention
from emoprompt.inference.last_position import (
    head_columns,
    last_layer,
    last_position_only,
    narrowing_agrees,
    output_head,
)
from emoprompt.inference.packed_linear import PackedLinears
from emoprompt.prompting.render import PromptParts

__all__ = ["Engine", "Generation", "LabelCollisionError", "PromptParts"]

log = logging.getLogger(__name__)

#: ``end_token`` default of :meth:`Engine.label_logprobs`: the tokenizer's end-of-turn token.
END_OF_TURN = "<end-of-turn>"

# Tokens of key/value cache (rows x cached length) that one batch may hold; a batch of
# long few-shot prompts is made smaller than ``batch_size`` to stay under it.
DEFAULT_MAX_BATCH_TOKENS = 16384
# Prompts given without a usable prefix share their common first tokens through the
# cache only when there are at least this many (else an extra forward pass is wasted).
MIN_SHARED_START = 8
# A batch attends to its shared prefix once for all rows (emoprompt.inference.attention) when the
# prefix has at least this many times the rows' own tokens; a shorter one is cheaper as
# part of each row's keys (one attention call instead of two and their merge).
SHARED_PREFIX_MIN_RATIO = 3
# Per model, whether each of the engine's ways of computing agrees with the plain
# forward pass (Engine._agrees): checked once, for every engine built on the model.
_AGREEMENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Generation:
    """One generated answer.

    ``tokens_in`` is the prompt's length in tokens (prefix + suffix), ``tokens_out`` the
    number of tokens generated, the stopping token (EOS, end of turn, newline) included.
    """

    text: str
    tokens_in: int
    tokens_out: int


class LabelCollisionError(ValueError):
    """Two labels start with the same token, so first-token scores cannot tell them apart."""


@dataclass
class _Item:
    """One prompt, encoded: ``ids`` are the suffix's tokens when ``prefix`` is set, else
    the full prompt's tokens."""

    index: int
    ids: list[int]
    n_prompt: int  # tokens of the whole prompt (prefix + suffix)


@dataclass
class _Group:
    prefix_ids: list[int]  # empty: no shared prefix
    items: list[_Item] = field(default_factory=list)


@dataclass
class _Batch:
    """The state of a batch after its prompts have been fed."""

    items: list[_Item]
    last_logits: torch.Tensor  # (B, V) next-token logits after each prompt (or B, columns)
    cache: object  # the model's Cache, holding prefix + suffixes
    mask: torch.Tensor  # (B, cached length) 1 for real tokens, 0 for padding
    next_pos: torch.Tensor  # (B,) position of the next token of each row


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _signature(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


class Engine:
    """Batched, prefix-cached scoring and generation with a Hugging Face causal LM.

    ``model`` and ``tokenizer`` are loaded by the caller; the tokenizer must have a pad
    token (``padding_side`` does not matter: the engine pads on the left itself). The
    model is put in eval mode; everything runs under ``torch.inference_mode`` on the
    model's device. ``reuse_prefix=False`` feeds full prompts (same batching): the
    reference path. ``max_batch_tokens`` bounds rows x cached length per batch.
    ``packed_weights`` lets float32 linear layers on a CPU run through oneDNN with
    weights packed once (:mod:`emoprompt.inference.packed_linear`; one more copy of them in memory).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 16,
        reuse_prefix: bool = True,
        progress: bool = True,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        packed_weights: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix
        self.progress = progress
        self.max_batch_tokens = max_batch_tokens
        self.device = next(model.parameters()).device
        # What one forward pass costs beyond its tokens, in tokens: on a CPU a pass
        # over a few tokens costs about as much as 30 more tokens; accelerators favour
        # full batches.
        self.pass_cost_tokens = 32 if self.device.type == "cpu" else 4096
        self._dtype = next(
            (p.dtype for p in model.parameters() if p.dtype.is_floating_point),
            torch.float32,
        )
        self.stats: dict[str, int] = Counter(
            prompts=0,
            tokens_in=0,
            tokens_out=0,
            label_tokens=0,
            forward_passes=0,
            fallbacks=0,
        )

        params = _signature(model)
        # transformers 5 renamed `past_key_values` to `cache` (the old name is deprecated).
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keeps_logits = "logits_to_keep" in params
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        self._bos = self._bos_to_add()
        self.end_of_turn_id = self._find_end_of_turn()
        self.stop_ids = self._find_stop_ids()
        config = getattr(model, "config", None)
        attn = getattr(config, "_attn_implementation", None) or "eager"
        if attn == SHARED_PREFIX_ATTENTION:  # set by an earlier engine: SDPA underneath
            attn = "sdpa"
        layer_types = getattr(config, "layer_types", None) or []
        sliding = any("sliding" in str(t) or "chunked" in str(t) for t in layer_types) or (
            not layer_types and getattr(config, "sliding_window", None) is not None
        )
        # Scoring all labels in one forward needs a custom 4D attention mask (a tree of
        # continuations); attention kernels that take no such mask, or sliding-window
        # layers, get one forward per label instead.
        self._tree_labels = attn in ("sdpa", "eager") and not sliding
        # transformers' sdpa path copies keys and values once per query head group
        # (repeat_kv) whenever a mask is given, because CUDA kernels cannot take a mask
        # with grouped-query attention; PyTorch's CPU kernel can (enable_gqa=True). For
        # short queries over a long cache (suffixes after a few-shot prefix, labels,
        # decoding) that saves ~20-30% of a forward pass; for long self-attention
        # (whole prompts) it is slightly slower, so it is used only for the former.
        self._force_gqa = attn == "sdpa" and self.device.type == "cpu"
        # Rows that continue one cached prefix share one copy of it and attend to it all
        # at once (see emoprompt.inference.attention): less memory, faster attention on a CPU.
        self._shared_attention = False
        if self._force_gqa and not sliding and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(register_attention())
            self._shared_attention = True
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
        # Passes that keep the last position's logits only run the last layer's output
        # projection and MLP for that position, and first-token scores compute the label
        # tokens' logits only (emoprompt.inference.last_position), once checked on this model.
        self._head = output_head(model)
        self._last_layer = last_layer(model)
        if self._last_layer is not None and not self._agrees(
            "narrowing",
            lambda ids: narrowing_agrees(model, self._last_layer, self._head, ids),
        ):
            log.warning("last-position narrowing changes this model's logits; not used")
            self._last_layer = None
        # Float32 linear layers on a CPU compute through oneDNN with weights packed once
        # (emoprompt.inference.packed_linear); the LM head stays plain (first-token scores narrow
        # it to the label columns, and it is often the input embedding's twin).
        self._packed = None
        if packed_weights and self.device.type == "cpu":
            self._packed = PackedLinears.of(model, exclude=[self._head] if self._head else [])
        if self._packed is not None and not self._agrees(
            "packed weights", lambda ids: logits_agree(model, ids, self._packed.active)
        ):
            log.warning("oneDNN-packed linear layers change this model's logits; not used")
            self._packed = None
        if self._packed is not None:
            log.info(
                "%d linear layers run through oneDNN with packed weights (%.0f MiB)",
                len(self._packed.modules),
                self._packed.nbytes / 2**20,
            )

    def _agrees(self, name: str, check: Callable[[torch.Tensor], bool]) -> bool:
        """``check(input_ids)`` on a short input, once per model and ``name``: whether a
        way of computing gives the plain forward pass's logits (it depends on the model's
        layers and kernels, not on its weights)."""
        results = _AGREEMENT.setdefault(self.model, {})
        if name not in results:
            ids = self._with_bos(self._encode(["Hola, ¿qué tal estás hoy?"])[0])
            results[name] = check(torch.tensor([ids], device=self.device))
        return results[name]

    @property
    def packed_weights(self) -> bool:
        """Whether linear layers run through oneDNN with packed weights."""
        return self._packed is not None

    # ------------------------------------------------------------------ tokenisation
    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def _bos_to_add(self) -> list[int]:
        """``[bos]`` if the tokenizer adds a BOS by default (prompts get it unless they
        already start with it), else ``[]``."""
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return []
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        default = self.tokenizer("a")["input_ids"]
        return [bos] if len(default) > len(plain) and default[0] == bos else []

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self._bos and (not ids or ids[0] != self._bos[0]):
            return self._bos + ids
        return ids

    def _token_id(self, token: str) -> list[int]:
        """The id(s) of a token given as text (a special token's name or plain text)."""
        vocab = self.tokenizer.get_vocab()
        if token in vocab:
            return [vocab[token]]
        ids = self._encode([token])[0]
        if not ids:
            raise ValueError(f"end token {token!r} encodes to no tokens")
        return ids

    def _find_end_of_turn(self) -> int | None:
        """The token that closes an assistant turn in the chat template, else EOS."""
        marker = "\u2042EMOPROMPT_ANSWER\u2042"
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(
                    [
                        {"role": "user", "content": "x"},
                        {"role": "assistant", "content": marker},
                    ],
                    tokenize=False,
                )
            except Exception:
                text = ""
            if marker in text:
                after = text.split(marker, 1)[1]
                ids = self._encode([after])[0] if after.strip() else []
                if ids:
                    return ids[0]
        return self.tokenizer.eos_token_id

    def _find_stop_ids(self) -> set[int]:
        stop: set[int] = set()
        candidates = [self.tokenizer.eos_token_id, self.end_of_turn_id]
        gen_config = getattr(self.model, "generation_config", None)
        eos = getattr(gen_config, "eos_token_id", None)
        candidates += eos if isinstance(eos, list | tuple) else [eos]
        for token_id in candidates:
            if token_id is not None:
                stop.add(int(token_id))
        return stop

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

    def _label_seqs(self, contexts: Sequence[str], labels: Sequence[str]) -> list[list[list[int]]]:
        """For each context, each label's tokens as written after that context."""
        if not labels:
            raise ValueError("no labels given")
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate labels: {list(labels)}")
        if self._tail_ok is None and contexts:
            self._tail_ok = True
            full = self._label_seqs_of([contexts[0]], labels)
            self._tail_ok = self._label_seqs_of([self._label_tail(contexts[0])], labels) == full
            if not self._tail_ok:
                log.info("labels are tokenised after the whole prompt (tail shortcut differs)")
        keys = [self._label_tail(c) if self._tail_ok else c for c in contexts]
        distinct = list(dict.fromkeys(keys))
        table = dict(zip(distinct, self._label_seqs_of(distinct, labels), strict=True))
        return [table[k] for k in keys]

    def _label_seqs_of(self, contexts: list[str], labels: Sequence[str]) -> list[list[list[int]]]:
        texts = []
        for context in contexts:
            texts.append(context)
            texts.extend(context + label for label in labels)
        encoded = self._encode(texts)
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

    def _check_collisions(self, labels: Sequence[str], firsts: Sequence[int]) -> None:
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

    def label_tokens(self, labels: Sequence[str], context: str) -> list[list[int]]:
        """Each label's tokens as the tokenizer writes them right after ``context``."""
        return self._label_seqs_of([context], labels)[0]

    def label_first_tokens(self, labels: Sequence[str], context: str) -> list[int]:
        """The first token of each label as the tokenizer writes it right after ``context``.

        Raises :class:`LabelCollisionError` if two labels share their first token.
        """
        firsts = [seq[0] for seq in self._label_seqs_of([context], labels)[0]]
        self._check_collisions(labels, firsts)
        return firsts

    # ------------------------------------------------------------------ planning
    def _plan(self, prompts: Sequence[PromptParts]) -> list[_Group]:
        """Encode the prompts and group them by shared prefix.

        Prompts whose prefix is shared (and splits at a token boundary) go to that
        prefix's group; the others are fed whole, grouped by their declared prefix
        (fallbacks) or all together. Then every group's common first tokens join its
        prefix (:meth:`_share_common_start`).
        """
        prompts = [(p.prefix, p.suffix) for p in prompts]  # any object with the two fields
        counts = Counter(prefix for prefix, _ in prompts)
        full_ids = [self._with_bos(ids) for ids in self._encode([a + b for a, b in prompts])]
        for i, ids in enumerate(full_ids):
            if not ids:
                raise ValueError(f"prompt {i} is empty")
        groups: dict[tuple[str, str], _Group] = {}
        candidates = [
            i
            for i, (prefix, suffix) in enumerate(prompts)
            if self.reuse_prefix and prefix and suffix and counts[prefix] > 1
        ]
        prefixes = list(dict.fromkeys(prompts[i][0] for i in candidates))
        prefix_ids = dict(zip(prefixes, self._encode(prefixes), strict=True))
        suffix_ids = dict(
            zip(candidates, self._encode([prompts[i][1] for i in candidates]), strict=True)
        )
        failed = []
        for i, (prefix, _) in enumerate(prompts):
            if i in suffix_ids:
                pre = self._with_bos(prefix_ids[prefix])
                if pre + suffix_ids[i] == full_ids[i]:
                    group = groups.setdefault(("prefix", prefix), _Group(pre))
                    group.items.append(_Item(i, suffix_ids[i], len(full_ids[i])))
                    continue
                failed.append(i)
                key = ("fallback", prefix)
            else:
                key = ("whole", "")
            groups.setdefault(key, _Group([])).items.append(_Item(i, full_ids[i], len(full_ids[i])))
        if self.reuse_prefix:
            for group in groups.values():
                self._share_common_start(group)
        if failed:
            self.stats["fallbacks"] += len(failed)
            prefix, suffix = prompts[failed[0]]
            shared = {
                key[1]: len(group.prefix_ids)
                for key, group in groups.items()
                if key[0] == "fallback"
            }
            log.warning(
                "%d of %d prompts: tokenize(prefix) + tokenize(suffix) != tokenize(prefix + "
                "suffix) (first: prompt %d, prefix ends %r, suffix starts %r), so they are fed "
                "whole; the tokens they have in common are still cached (%d for the first)",
                len(failed),
                len(prompts),
                failed[0],
                prefix[-20:],
                suffix[:20],
                shared[prefix],
            )
        return list(groups.values())

    @staticmethod
    def _share_common_start(group: _Group) -> None:
        """Move the tokens that all of a group's prompts start with into its prefix.

        Token-level, so exact: e.g. the user-turn header that opens every suffix, or
        the system prompt of prompts that came without a shared prefix or fell back
        to their full text. Each prompt keeps at least one token of its own.
        """
        if len(group.items) < 2:
            return
        common: list[int] = []
        for column in zip(*(it.ids[:-1] for it in group.items), strict=False):
            if any(token != column[0] for token in column):
                break
            common.append(column[0])
        if not common or (not group.prefix_ids and len(common) < MIN_SHARED_START):
            return
        group.prefix_ids = group.prefix_ids + common
        for it in group.items:
            it.ids = it.ids[len(common) :]

    def _batches_of(self, group: _Group, extra: int, passes: int) -> list[list[_Item]]:
        """Split a group into batches of at most ``batch_size`` rows (and
        ``max_batch_tokens`` cached tokens), longest prompts first.

        Rows are padded to the batch's longest prompt, so the split minimises the
        padded tokens fed plus a fixed cost per forward pass (``passes`` per batch,
        each worth ``pass_cost_tokens`` tokens): contiguous runs of the prompts
        sorted by length, chosen by dynamic programming.
        """
        items = sorted(group.items, key=lambda it: -len(it.ids))
        lens = [len(it.ids) for it in items]
        plen, overhead = len(group.prefix_ids), self.pass_cost_tokens * passes
        best = [0.0] + [float("inf")] * len(items)
        start_of = [0] * (len(items) + 1)
        for end in range(1, len(items) + 1):
            for start in range(end - 1, max(-1, end - self.batch_size - 1), -1):
                rows = end - start
                # cached prefix tokens per row: none when the rows share one copy
                per_row = 0 if self._shares_prefix(plen, lens[start]) else plen
                if rows > 1 and rows * (per_row + lens[start] + extra) > self.max_batch_tokens:
                    break
                cost = best[start] + rows * lens[start] + overhead
                if cost < best[end]:
                    best[end], start_of[end] = cost, start
        batches, end = [], len(items)
        while end > 0:
            batches.append(items[start_of[end] : end])
            end = start_of[end]
        return batches[::-1]

    # ------------------------------------------------------------------ model calls
    def _forward(self, input_ids, mask, positions, cache, *, keep_last: bool, columns=None):
        """One forward pass: the logits of the last position (``keep_last``) or of all
        positions, over the vocabulary or over the token ids ``columns``; and the cache."""
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
            self._cache_arg: cache,
        }
        if keep_last and self._keeps_logits:
            kwargs["logits_to_keep"] = 1
        with contextlib.ExitStack() as stack:
            if self._force_gqa and 2 * input_ids.shape[1] <= mask.shape[-1]:
                stack.enter_context(_env(TRANSFORMERS_SDPA_FORCE_GQA="1"))
            if self._shared_attention and cache is not None:
                stack.enter_context(shared_prefix(cache))
            if self._packed is not None:
                stack.enter_context(self._packed.active())
            if keep_last and self._last_layer is not None and input_ids.shape[1] > 1:
                stack.enter_context(last_position_only(self._last_layer))
            narrowed_head = columns is not None and self._head is not None
            if narrowed_head:
                stack.enter_context(head_columns(self._head, columns))
            out = self.model(**kwargs)
        self.stats["forward_passes"] += 1
        logits = out.logits[:, -1] if keep_last else out.logits
        if columns is not None and not narrowed_head:
            logits = logits[..., columns]
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return logits, new_cache

    def _prefix_cache(self, prefix_ids: list[int]):
        ids = torch.tensor([prefix_ids], device=self.device)
        mask = torch.ones_like(ids)
        positions = torch.arange(len(prefix_ids), device=self.device)[None]
        _, cache = self._forward(ids, mask, positions, None, keep_last=True)
        self.stats["tokens_in"] += len(prefix_ids)
        return cache

    def _shares_prefix(self, prefix: int, width: int) -> bool:
        """Whether a batch of rows of ``width`` tokens after a ``prefix``-token prefix
        holds that prefix once for all rows (else a copy per row)."""
        return self._shared_attention and prefix >= SHARED_PREFIX_MIN_RATIO * width

    def _expand_cache(self, cache, rows: int, width: int):
        """A cache for ``rows`` rows that starts as ``cache`` (one row) and leaves it intact.

        Plain dynamic layers become shared-prefix layers (one copy for all rows) under
        the shared-prefix attention when the prefix is long next to the rows' own
        ``width`` tokens, else a broadcast view (the forward concatenates new keys into
        fresh tensors, never writing into the view); other layer kinds are copied.
        """
        from transformers.cache_utils import DynamicLayer

        shared = self._shares_prefix(cache.get_seq_length(), width)
        new = copy.copy(cache)
        new.layers = []
        for layer in cache.layers:
            plain = type(layer) is DynamicLayer and layer.is_initialized
            if plain and shared:
                new.layers.append(SharedPrefixLayer(layer.keys, layer.values, rows))
            elif plain:
                view = copy.copy(layer)
                view.keys = layer.keys.expand(rows, -1, -1, -1)
                view.values = layer.values.expand(rows, -1, -1, -1)
                new.layers.append(view)
            else:
                layer = copy.deepcopy(layer)
                layer.batch_repeat_interleave(rows)
                new.layers.append(layer)
        return new

    def _prefill(
        self, prefix_ids: list[int], prefix_cache, items: list[_Item], columns=None
    ) -> _Batch:
        rows, width, plen = (
            len(items),
            max(len(it.ids) for it in items),
            len(prefix_ids),
        )
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        smask = torch.zeros((rows, width), dtype=torch.long)
        for r, it in enumerate(items):
            ids[r, width - len(it.ids) :] = torch.tensor(it.ids)
            smask[r, width - len(it.ids) :] = 1
        positions = (plen + smask.cumsum(-1) - 1).masked_fill(smask == 0, 1)
        mask = torch.cat([torch.ones((rows, plen), dtype=torch.long), smask], dim=1)
        cache = self._expand_cache(prefix_cache, rows, width) if prefix_ids else None
        ids, mask, positions = (t.to(self.device) for t in (ids, mask, positions))
        logits, cache = self._forward(ids, mask, positions, cache, keep_last=True, columns=columns)
        self.stats["tokens_in"] += int(smask.sum())
        next_pos = torch.tensor([plen + len(it.ids) for it in items], device=self.device)
        return _Batch(items, logits, cache, mask, next_pos)

    def _run(
        self,
        prompts: Sequence[PromptParts],
        desc: str,
        extra: int = 0,
        passes: int = 1,
        columns: torch.Tensor | None = None,
    ) -> Iterator[_Batch]:
        """Feed the prompts batch by batch (grouped by prefix) and yield each batch's state
        (its last logits over the token ids ``columns`` only, when given)."""
        groups = self._plan(prompts)
        self.stats["prompts"] += len(prompts)
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not self.progress) as bar:
            for group in groups:
                prefix_cache = self._prefix_cache(group.prefix_ids) if group.prefix_ids else None
                for items in self._batches_of(group, extra, passes):
                    yield self._prefill(group.prefix_ids, prefix_cache, items, columns)
                    bar.update(len(items))
                del prefix_cache

    # ------------------------------------------------------------------ strategies
    @torch.inference_mode()
    def first_token_probs(
        self, prompts: Sequence[PromptParts], labels: Sequence[str]
    ) -> np.ndarray:
        """(n_prompts, n_labels): next-token probabilities of each label's first token,
        renormalised over the labels (softmax over those logits); rows sum to 1."""
        prompts = list(prompts)
        if not prompts:
            return np.zeros((0, len(labels)))
        seqs = self._label_seqs([p.prefix + p.suffix for p in prompts], labels)
        firsts = [[s[0] for s in row] for row in seqs]
        for row in {tuple(f) for f in firsts}:
            self._check_collisions(labels, row)
        # Only the label tokens' logits are computed: ``columns`` holds their ids.
        vocab = sorted({t for row in firsts for t in row})
        column_of = {t: i for i, t in enumerate(vocab)}
        columns = torch.tensor(vocab, device=self.device)
        out = np.zeros((len(prompts), len(labels)), dtype=np.float64)
        for batch in self._run(prompts, "first-token scores", columns=columns):
            index = torch.tensor(
                [[column_of[t] for t in firsts[it.index]] for it in batch.items],
                device=self.device,
            )
            chosen = batch.last_logits.float().gather(1, index)
            probs = torch.softmax(chosen, dim=-1).cpu().double().numpy()
            out[[it.index for it in batch.items]] = probs
            del batch
        return out

    @torch.inference_mode()
    def label_logprobs(
        self,
        prompts: Sequence[PromptParts],
        labels: Sequence[str],
        *,
        end_token: str | None = END_OF_TURN,
        normalize: bool = False,
    ) -> np.ndarray:
        """(n_prompts, n_labels): log-likelihood of each label's tokens as the answer.

        The label's tokens are those the tokenizer writes after the prompt; ``end_token``
        (default: the end-of-turn token, e.g. ``<|eot_id|>``/``<|im_end|>``, else EOS;
        ``None``: nothing) is scored after them. ``normalize=True`` divides by the number
        of scored tokens. Each prompt is encoded once; its labels are scored as
        continuations of its cache.
        """
        prompts = list(prompts)
        if not prompts:
            return np.zeros((0, len(labels)))
        if end_token == END_OF_TURN:
            if self.end_of_turn_id is None:
                raise ValueError("the tokenizer has no end-of-turn or EOS token; pass end_token")
            end_ids = [self.end_of_turn_id]
        else:
            end_ids = self._token_id(end_token) if end_token is not None else []
        seqs = [
            [s + end_ids for s in row]
            for row in self._label_seqs([p.prefix + p.suffix for p in prompts], labels)
        ]
        out = np.zeros((len(prompts), len(labels)), dtype=np.float64)
        longest = max(sum(len(s) for s in row) for row in seqs)
        for batch in self._run(prompts, "label likelihoods", extra=longest, passes=2):
            rows = [seqs[it.index] for it in batch.items]
            scores = self._score_continuations(batch, rows)
            if normalize:
                scores = scores / torch.tensor([[len(s) for s in row] for row in rows])
            out[[it.index for it in batch.items]] = scores.double().numpy()
            del batch
        return out

    def _score_continuations(self, batch: _Batch, rows: list[list[list[int]]]) -> torch.Tensor:
        """Sum of log-probabilities of each continuation after each row's prompt: (B, L)."""
        n_labels = len(rows[0])
        first_lp = torch.log_softmax(batch.last_logits.float(), dim=-1)
        index = torch.tensor([[s[0] for s in row] for row in rows], device=self.device)
        scores = first_lp.gather(1, index).cpu()
        del first_lp
        if all(len(s) == 1 for row in rows for s in row):
            return scores
        if self._tree_labels:
            return scores + self._score_tree(batch, rows)
        rest = torch.zeros_like(scores)
        for j in range(n_labels):
            rest[:, j] = self._score_one_label(batch, [row[j] for row in rows])
        return scores + rest

    def _score_tree(self, batch: _Batch, rows: list[list[list[int]]]) -> torch.Tensor:
        """All labels of all rows in one forward: each row's labels (but their last token)
        are laid side by side after its prompt; a 4D mask lets each label's tokens see the
        prompt and the label's earlier tokens only, and positions restart at each label."""
        n_rows, n_labels = len(rows), len(rows[0])
        width = max(sum(len(s) - 1 for s in row) for row in rows)
        ids = torch.full((n_rows, width), self.pad_id, dtype=torch.long)
        segment = torch.full((n_rows, width), -1, dtype=torch.long)
        offset = torch.zeros((n_rows, width), dtype=torch.long)
        target = torch.full((n_rows, width), 0, dtype=torch.long)
        for r, row in enumerate(rows):
            col = 0
            for j, seq in enumerate(row):
                n = len(seq) - 1
                ids[r, col : col + n] = torch.tensor(seq[:-1])
                target[r, col : col + n] = torch.tensor(seq[1:])
                segment[r, col : col + n] = j
                offset[r, col : col + n] = torch.arange(1, n + 1) - 1
                col += n
        dtype = self._dtype
        q = torch.arange(width)
        same = (segment[:, :, None] == segment[:, None, :]) & (q[None, :, None] >= q[None, None, :])
        same |= torch.eye(width, dtype=torch.bool)[None]  # padding attends to itself
        allowed = torch.cat(
            [batch.mask.bool().cpu()[:, None, :].expand(-1, width, -1), same], dim=-1
        )
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        positions = batch.next_pos.cpu()[:, None] + offset
        logits, _ = self._forward(
            ids.to(self.device),
            mask[:, None].to(self.device),
            positions.to(self.device),
            batch.cache,
            keep_last=False,
        )
        self.stats["label_tokens"] += int((segment >= 0).sum())
        target = target.to(self.device)
        token_lp = torch.empty(target.shape, dtype=torch.float32)
        for r in range(n_rows):  # one row at a time: no (B, Q, V) float32 copy
            row_logits = logits[r].float()
            token_lp[r] = (
                row_logits.gather(1, target[r, :, None]).squeeze(1) - row_logits.logsumexp(-1)
            ).cpu()
        del logits
        token_lp = token_lp.masked_fill(segment < 0, 0.0)
        out = torch.zeros((n_rows, n_labels), dtype=torch.float32)
        out.scatter_add_(1, segment.clamp(min=0), token_lp)
        return out

    def _score_one_label(self, batch: _Batch, seqs: list[list[int]]) -> torch.Tensor:
        """Tokens 2.. of one label per row, fed on a copy of the batch cache: (B,)."""
        n_rows = len(seqs)
        width = max(len(s) - 1 for s in seqs)
        if width == 0:
            return torch.zeros(n_rows)
        ids = torch.full((n_rows, width), self.pad_id, dtype=torch.long)
        target = torch.zeros((n_rows, width), dtype=torch.long)
        real = torch.zeros((n_rows, width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            n = len(seq) - 1
            ids[r, :n] = torch.tensor(seq[:-1])
            target[r, :n] = torch.tensor(seq[1:])
            real[r, :n] = 1
        mask = torch.cat([batch.mask.cpu(), real], dim=1)
        positions = batch.next_pos.cpu()[:, None] + torch.arange(width)[None]
        cache = copy.deepcopy(batch.cache)
        logits, _ = self._forward(
            ids.to(self.device),
            mask.to(self.device),
            positions.to(self.device),
            cache,
            keep_last=False,
        )
        self.stats["label_tokens"] += int(real.sum())
        logits = logits.float()
        lp = logits.gather(2, target.to(self.device)[..., None]).squeeze(-1) - logits.logsumexp(-1)
        return (lp.cpu() * real).sum(1)

    @torch.inference_mode()
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
        """Batched greedy decoding (or sampling at ``temperature`` with a generator seeded
        with ``seed``). A row stops at EOS / end of turn (and at its first newline with
        ``stop_at_newline``, the text being cut there); the batch stops when all rows have.
        The text is decoded without special tokens. Greedy output equals
        ``model.generate(do_sample=False)`` on each prompt alone, with these stop tokens.
        Sampled output depends on the seed and on how prompts fall into batches."""
        prompts = list(prompts)
        if do_sample and temperature <= 0:
            raise ValueError("temperature must be positive when sampling")
        generator = None
        if do_sample:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        out: list[Generation | None] = [None] * len(prompts)
        for batch in self._run(
            prompts, "generation", extra=max_new_tokens, passes=1 + max_new_tokens
        ):
            tokens = self._decode_loop(
                batch,
                max_new_tokens,
                do_sample,
                temperature,
                generator,
                stop_at_newline,
            )
            for it, toks in zip(batch.items, tokens, strict=True):
                out[it.index] = self._to_generation(toks, it.n_prompt, stop_at_newline)
            del batch
        return out  # type: ignore[return-value]

    def _is_newline(self, token: int) -> bool:
        if token not in self._newline_ids:
            self._newline_ids[token] = "\n" in self.tokenizer.decode([token])
        return self._newline_ids[token]

    def _decode_loop(
        self, batch, max_new_tokens, do_sample, temperature, generator, stop_at_newline
    ) -> list[list[int]]:
        rows = len(batch.items)
        done = [False] * rows
        generated: list[list[int]] = [[] for _ in range(rows)]
        stop_ids = self.stop_ids
        logits, cache, mask, pos = (
            batch.last_logits,
            batch.cache,
            batch.mask,
            batch.next_pos,
        )
        for step in range(max_new_tokens):
            if do_sample:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(dim=-1)
            values = token.tolist()
            for r in range(rows):
                if done[r]:
                    values[r] = self.pad_id
                    continue
                generated[r].append(values[r])
                self.stats["tokens_out"] += 1
                if values[r] in stop_ids or (stop_at_newline and self._is_newline(values[r])):
                    done[r] = True
            if all(done) or step == max_new_tokens - 1:
                break
            token = torch.tensor(values, device=self.device)
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=self.device)], 1)
            logits, cache = self._forward(token[:, None], mask, pos[:, None], cache, keep_last=True)
            pos = pos + 1
        return generated

    def _to_generation(self, tokens: list[int], n_prompt: int, stop_at_newline: bool) -> Generation:
        body = tokens[:-1] if tokens and tokens[-1] in self.stop_ids else tokens
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        if stop_at_newline:
            text = text.split("\n", 1)[0]
        return Generation(text=text, tokens_in=n_prompt, tokens_out=len(tokens))
