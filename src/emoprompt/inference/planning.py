"""Batch planning: prompts encoded, grouped by the prefix they share, cut into batches.

A prefix is used only for prompts where ``tokenize(prefix) + tokenize(suffix) ==
tokenize(prefix + suffix)``; any other prompt falls back to its full text (logged as a
WARNING, counted in ``stats["fallbacks"]``), so the split never changes the result.
Besides the declared prefix, the tokens that all prompts of a group start with (the
user-turn header, or the system prompt of prompts that fell back) join the cached
prefix. Batches are runs of the prompts sorted by length, split so as to minimise
padded tokens plus a per-pass cost.

Under a sliding window (``window``) a row that reuses a prefix has its pad gap inside the
window, which is exact only while the whole row - the prompt and every token fed after
it (``extra``) - fits the window: prompts that do not fit are fed whole instead (left
padding only, the safe path), counted in ``stats["outside_window"]``. Rows are at most
as wide as the longest prompt of their batch, so every batch that reuses a prefix fits.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field

from emoprompt.inference.tokens import TokenizerRules
from emoprompt.prompting.render import PromptParts

log = logging.getLogger(__name__)

# Prompts given without a usable prefix share their common first tokens through the
# cache only when there are at least this many (else an extra forward pass is wasted).
MIN_SHARED_START = 8


@dataclass
class Item:
    """One prompt, encoded: ``ids`` are the suffix's tokens when its group has a prefix,
    else the full prompt's tokens."""

    index: int
    ids: list[int]
    n_prompt: int  # tokens of the whole prompt (prefix + suffix)


@dataclass
class Group:
    prefix_ids: list[int]  # empty: no shared prefix
    items: list[Item] = field(default_factory=list)


@dataclass
class BatchPlanner:
    """Plans the batches of one engine.

    ``shares_prefix(prefix_tokens, row_tokens)`` tells whether a batch holds its prefix
    once for all rows (then it costs no cache per row); ``pass_cost_tokens`` is what one
    forward pass costs beyond its tokens, in tokens.
    """

    rules: TokenizerRules
    stats: MutableMapping[str, int]
    shares_prefix: Callable[[int, int], bool]
    batch_size: int
    max_batch_tokens: int
    pass_cost_tokens: int
    reuse_prefix: bool = True
    window: int | None = None  # the model's attention window (None: full attention)

    def plan(self, prompts: Sequence[PromptParts], extra: int = 0) -> list[Group]:
        """Encode the prompts and group them by shared prefix.

        Prompts whose prefix is shared (and splits at a token boundary) go to that
        prefix's group; the others are fed whole, grouped by their declared prefix
        (fallbacks) or all together. Then every group's common first tokens join its
        prefix (:func:`share_common_start`), and under a window the prompts that would
        not fit it with ``extra`` more tokens leave their prefix (:meth:`_fit_window`).
        """
        pairs = [(p.prefix, p.suffix) for p in prompts]  # any object with the two fields
        counts = Counter(prefix for prefix, _ in pairs)
        full_ids = [
            self.rules.with_bos(ids) for ids in self.rules.encode([a + b for a, b in pairs])
        ]
        for i, ids in enumerate(full_ids):
            if not ids:
                raise ValueError(f"prompt {i} is empty")
        candidates = [
            i
            for i, (prefix, suffix) in enumerate(pairs)
            if self.reuse_prefix and prefix and suffix and counts[prefix] > 1
        ]
        prefixes = list(dict.fromkeys(pairs[i][0] for i in candidates))
        prefix_ids = dict(zip(prefixes, self.rules.encode(prefixes), strict=True))
        suffix_ids = dict(
            zip(candidates, self.rules.encode([pairs[i][1] for i in candidates]), strict=True)
        )
        groups: dict[tuple[str, str], Group] = {}
        failed = []
        for i, (prefix, _) in enumerate(pairs):
            if i in suffix_ids:
                pre = self.rules.with_bos(prefix_ids[prefix])
                if pre + suffix_ids[i] == full_ids[i]:
                    group = groups.setdefault(("prefix", prefix), Group(pre))
                    group.items.append(Item(i, suffix_ids[i], len(full_ids[i])))
                    continue
                failed.append(i)
                key = ("fallback", prefix)
            else:
                key = ("whole", "")
            groups.setdefault(key, Group([])).items.append(Item(i, full_ids[i], len(full_ids[i])))
        if self.reuse_prefix:
            for group in groups.values():
                share_common_start(group)
        if failed:
            self._report_fallbacks(pairs, failed, groups)
        return self._fit_window(list(groups.values()), extra)

    def _fit_window(self, groups: list[Group], extra: int) -> list[Group]:
        """Under a window: every prompt of a prefix group whose row (``n_prompt +
        extra`` cache slots) would not fit it, fed whole in a group of its own."""
        if self.window is None:
            return groups
        whole = Group([])
        for group in groups:
            if not group.prefix_ids:
                continue
            outside = [it for it in group.items if it.n_prompt + extra > self.window]
            if not outside:
                continue
            group.items = [it for it in group.items if it.n_prompt + extra <= self.window]
            for it in outside:
                whole.items.append(Item(it.index, group.prefix_ids + it.ids, it.n_prompt))
        if whole.items:
            self.stats["outside_window"] += len(whole.items)
            log.info(
                "%d of the prompts do not fit the %d-token attention window with %d more "
                "tokens: fed whole, without prefix reuse",
                len(whole.items),
                self.window,
                extra,
            )
        kept = [group for group in groups if group.items]
        return kept + ([whole] if whole.items else [])

    def _report_fallbacks(
        self, pairs: list[tuple[str, str]], failed: list[int], groups: dict[tuple[str, str], Group]
    ) -> None:
        self.stats["fallbacks"] += len(failed)
        prefix, suffix = pairs[failed[0]]
        shared = {
            key[1]: len(group.prefix_ids) for key, group in groups.items() if key[0] == "fallback"
        }
        log.warning(
            "%d of %d prompts: tokenize(prefix) + tokenize(suffix) != tokenize(prefix + "
            "suffix) (first: prompt %d, prefix ends %r, suffix starts %r), so they are fed "
            "whole; the tokens they have in common are still cached (%d for the first)",
            len(failed),
            len(pairs),
            failed[0],
            prefix[-20:],
            suffix[:20],
            shared[prefix],
        )

    def batches_of(self, group: Group, extra: int, passes: int) -> list[list[Item]]:
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
                per_row = 0 if self.shares_prefix(plen, lens[start]) else plen
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


def share_common_start(group: Group) -> None:
    """Move the tokens that all of a group's prompts start with into its prefix.

    Token-level, so exact: e.g. the user-turn header that opens every suffix, or the
    system prompt of prompts that came without a shared prefix or fell back to their
    full text. Each prompt keeps at least one token of its own.
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
