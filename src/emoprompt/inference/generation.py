"""Batched greedy decoding (or seeded sampling) on top of the prefilled batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emoprompt.inference.backend import Decoding, Generation, answer
from emoprompt.inference.passes import Batch, ForwardPasses
from emoprompt.inference.planning import BatchPlanner
from emoprompt.inference.tokens import TokenizerRules
from emoprompt.prompting.render import PromptParts


def generate(
    passes: ForwardPasses,
    planner: BatchPlanner,
    rules: TokenizerRules,
    stop_ids: set[int],
    prompts: Sequence[PromptParts],
    decoding: Decoding,
) -> list[Generation]:
    """Every prompt's answer (see :meth:`emoprompt.inference.engine.Engine.generate`)."""
    generator = None
    if decoding.do_sample:
        generator = torch.Generator(device=passes.device).manual_seed(decoding.seed)
    out: list[Generation | None] = [None] * len(prompts)
    steps = decoding.max_new_tokens
    for batch in passes.run(planner, prompts, "generation", extra=steps, passes=1 + steps):
        tokens = _decode_loop(passes, rules, stop_ids, batch, decoding, generator)
        for it, toks in zip(batch.items, tokens, strict=True):
            out[it.index] = answer(rules, stop_ids, toks, it.n_prompt, decoding)
        del batch
    return out  # type: ignore[return-value]


def _decode_loop(
    passes: ForwardPasses,
    rules: TokenizerRules,
    stop_ids: set[int],
    batch: Batch,
    decoding: Decoding,
    generator: torch.Generator | None,
) -> list[list[int]]:
    rows = len(batch.items)
    done = [False] * rows
    generated: list[list[int]] = [[] for _ in range(rows)]
    logits, cache, mask, pos = batch.last_logits, batch.cache, batch.mask, batch.next_pos
    device = passes.device
    for step in range(decoding.max_new_tokens):
        if decoding.do_sample:
            probs = torch.softmax(logits.float() / decoding.temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(dim=-1)
        values = token.tolist()
        for r in range(rows):
            if done[r]:
                values[r] = passes.pad_id
                continue
            generated[r].append(values[r])
            passes.stats["tokens_out"] += 1
            if values[r] in stop_ids or (decoding.stop_at_newline and rules.is_newline(values[r])):
                done[r] = True
        if all(done) or step == decoding.max_new_tokens - 1:
            break
        token = torch.tensor(values, device=device)
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], 1)
        logits, cache = passes.forward(token[:, None], mask, pos[:, None], cache, keep_last=True)
        pos = pos + 1
    return generated
