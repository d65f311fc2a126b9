"""Forward passes and the KV-cache handling around them.

The text that many prompts share (:attr:`PromptParts.prefix`: the system prompt and the
few-shot turns) is encoded once per group (:meth:`ForwardPasses.prefix_cache`), and
every batch feeds only the per-tweet suffixes on top of it. On a CPU with SDPA
attention a batch keeps one copy of a long prefix (at least ``SHARED_PREFIX_MIN_RATIO``
times the suffixes) for all its rows and attends to it once for all of them
(:mod:`emoprompt.inference.attention`); otherwise each row gets a broadcast view of it.
Left-padded suffixes after a shared prefix leave pad gaps in the middle of each row; the
attention mask ``[prefix ones | suffix mask]`` and explicit ``position_ids`` (counting
real tokens only) make every row compute exactly what it would alone.

Notes on transformers 5 (5.24): the cache argument and output field are ``cache``
(``past_key_values`` is a deprecated alias until 5.40); a ``DynamicCache`` is a list of
``DynamicLayer`` objects holding ``keys``/``values`` that ``update`` replaces by
concatenation (never writes in place), which is what lets a batch start from a
broadcast view of the one-row prefix cache; a 4D ``attention_mask`` is passed to the
attention function as is; ``logits_to_keep`` limits the LM head to the last positions.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from emoprompt.inference.attention import SharedPrefixLayer, shared_prefix
from emoprompt.inference.capabilities import Capabilities
from emoprompt.inference.planning import BatchPlanner, Item
from emoprompt.prompting.render import PromptParts

# A batch attends to its shared prefix once for all rows (emoprompt.inference.attention)
# when the prefix has at least this many times the rows' own tokens; a shorter one is
# cheaper as part of each row's keys (one attention call instead of two and their merge).
SHARED_PREFIX_MIN_RATIO = 3
# The most tokens of a row fed in one pass: longer rows (a tweet cut to the model's
# context) are fed in parts. Prompts of the study stay far below it (a twenty-shot
# prompt's own part is under 100 tokens), so their passes are unchanged.
PREFILL_CHUNK_TOKENS = 2048


@dataclass
class Batch:
    """The state of a batch after its prompts have been fed."""

    items: list[Item]
    last_logits: torch.Tensor  # (B, V) next-token logits after each prompt (or B, columns)
    cache: object  # the model's Cache, holding prefix + suffixes
    mask: torch.Tensor  # (B, cached length) 1 for real tokens, 0 for padding
    next_pos: torch.Tensor  # (B,) position of the next token of each row


class ForwardPasses:
    """Runs one model's forward passes with the capabilities decided for it."""

    def __init__(
        self,
        model: Any,
        caps: Capabilities,
        pad_id: int,
        stats: MutableMapping[str, int],
        progress: bool = True,
    ) -> None:
        self.model = model
        self.caps = caps
        self.pad_id = pad_id
        self.stats = stats
        self.progress = progress
        self.device = next(model.parameters()).device

    def forward(self, input_ids, mask, positions, cache, *, keep_last: bool, columns=None):
        """One forward pass: the logits of the last position (``keep_last``) or of all
        positions, over the vocabulary or over the token ids ``columns``; and the cache."""
        caps = self.caps
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
            caps.cache_arg: cache,
        }
        if keep_last and caps.keeps_logits:
            kwargs["logits_to_keep"] = 1
        with contextlib.ExitStack() as stack:
            if caps.uses("shared_attention") and cache is not None:
                stack.enter_context(shared_prefix(cache))
            if caps.packed is not None:
                stack.enter_context(caps.packed.active())
            out = self.model(**kwargs)
        self.stats["forward_passes"] += 1
        logits = out.logits[:, -1] if keep_last else out.logits
        if columns is not None:
            logits = logits[..., columns]
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return logits, new_cache

    def prefix_cache(self, prefix_ids: list[int]):
        ids = torch.tensor([prefix_ids], device=self.device)
        mask = torch.ones_like(ids)
        positions = torch.arange(len(prefix_ids), device=self.device)[None]
        _, cache = self.forward(ids, mask, positions, None, keep_last=True)
        self.stats["tokens_in"] += len(prefix_ids)
        return cache

    def shares_prefix(self, prefix: int, width: int) -> bool:
        """Whether a batch of rows of ``width`` tokens after a ``prefix``-token prefix
        holds that prefix once for all rows (else a copy per row)."""
        return self.caps.uses("shared_attention") and prefix >= SHARED_PREFIX_MIN_RATIO * width

    def expand_cache(self, cache, rows: int, width: int):
        """A cache for ``rows`` rows that starts as ``cache`` (one row) and leaves it intact.

        Plain dynamic layers become shared-prefix layers (one copy for all rows) under
        the shared-prefix attention when the prefix is long next to the rows' own
        ``width`` tokens, else a broadcast view (the forward concatenates new keys into
        fresh tensors, never writing into the view); other layer kinds are copied.
        """
        from transformers.cache_utils import DynamicLayer

        shared = self.shares_prefix(cache.get_seq_length(), width)
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

    def prefill(
        self, prefix_ids: list[int], prefix_cache, items: list[Item], columns=None
    ) -> Batch:
        rows, width, plen = len(items), max(len(it.ids) for it in items), len(prefix_ids)
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        smask = torch.zeros((rows, width), dtype=torch.long)
        for r, it in enumerate(items):
            ids[r, width - len(it.ids) :] = torch.tensor(it.ids)
            smask[r, width - len(it.ids) :] = 1
        positions = (plen + smask.cumsum(-1) - 1).masked_fill(smask == 0, 1)
        mask = torch.cat([torch.ones((rows, plen), dtype=torch.long), smask], dim=1)
        cache = self.expand_cache(prefix_cache, rows, width) if prefix_ids else None
        ids, mask, positions = (t.to(self.device) for t in (ids, mask, positions))
        # A row longer than PREFILL_CHUNK_TOKENS is fed in parts through the cache, so that
        # no pass attends from more than that many queries at once: memory stays bounded
        # by the token counts however long a prompt is.
        start = 0
        while width - start > PREFILL_CHUNK_TOKENS:
            end = start + PREFILL_CHUNK_TOKENS
            _, cache = self.forward(
                ids[:, start:end],
                mask[:, : plen + end],
                positions[:, start:end],
                cache,
                keep_last=True,
            )
            start = end
        logits, cache = self.forward(
            ids[:, start:], mask, positions[:, start:], cache, keep_last=True, columns=columns
        )
        self.stats["tokens_in"] += int(smask.sum())
        next_pos = torch.tensor([plen + len(it.ids) for it in items], device=self.device)
        return Batch(items, logits, cache, mask, next_pos)

    def run(
        self,
        planner: BatchPlanner,
        prompts: Sequence[PromptParts],
        desc: str,
        extra: int = 0,
        passes: int = 1,
        columns: torch.Tensor | None = None,
    ) -> Iterator[Batch]:
        """Feed the prompts batch by batch (grouped by prefix) and yield each batch's state
        (its last logits over the token ids ``columns`` only, when given)."""
        groups = planner.plan(prompts, extra)
        self.stats["prompts"] += len(prompts)
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not self.progress) as bar:
            for group in groups:
                prefix_cache = self.prefix_cache(group.prefix_ids) if group.prefix_ids else None
                for items in planner.batches_of(group, extra, passes):
                    yield self.prefill(group.prefix_ids, prefix_cache, items, columns)
                    bar.update(len(items))
                del prefix_cache
