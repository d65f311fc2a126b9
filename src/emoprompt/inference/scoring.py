"""Scoring the labels after each prompt: first-token probabilities and label likelihoods.

Label likelihoods score all labels of a batch in one extra pass where the capabilities
allow it (:func:`score_tree`): the labels are laid side by side after each prompt, with
a 4D attention mask that lets each label see only the prompt and itself; otherwise each
label gets a pass of its own on a copy of the batch's cache (:func:`score_one_label`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from emoprompt.inference.passes import Batch, ForwardPasses
from emoprompt.inference.planning import BatchPlanner
from emoprompt.inference.tokens import TokenizerRules
from emoprompt.prompting.render import PromptParts


def first_token_probs(
    passes: ForwardPasses,
    planner: BatchPlanner,
    rules: TokenizerRules,
    prompts: Sequence[PromptParts],
    labels: Sequence[str],
) -> np.ndarray:
    """(n_prompts, n_labels): next-token probabilities of each label's first token,
    renormalised over the labels (softmax over those logits); rows sum to 1."""
    seqs = rules.label_seqs([p.prefix + p.suffix for p in prompts], labels)
    firsts = [[s[0] for s in row] for row in seqs]
    for row in {tuple(f) for f in firsts}:
        rules.check_collisions(labels, row)
    # Only the label tokens' logits are computed: ``columns`` holds their ids.
    vocab = sorted({t for row in firsts for t in row})
    column_of = {t: i for i, t in enumerate(vocab)}
    columns = torch.tensor(vocab, device=passes.device)
    out = np.zeros((len(prompts), len(labels)), dtype=np.float64)
    for batch in passes.run(planner, prompts, "first-token scores", columns=columns):
        index = torch.tensor(
            [[column_of[t] for t in firsts[it.index]] for it in batch.items],
            device=passes.device,
        )
        chosen = batch.last_logits.float().gather(1, index)
        probs = torch.softmax(chosen, dim=-1).cpu().double().numpy()
        out[[it.index for it in batch.items]] = probs
        del batch
    return out


def label_logprobs(
    passes: ForwardPasses,
    planner: BatchPlanner,
    rules: TokenizerRules,
    prompts: Sequence[PromptParts],
    labels: Sequence[str],
    end_ids: list[int],
    *,
    normalize: bool,
    dtype: torch.dtype,
) -> np.ndarray:
    """(n_prompts, n_labels): log-likelihood of each label's tokens then ``end_ids``;
    ``normalize`` divides by the number of scored tokens."""
    seqs = [
        [s + end_ids for s in row]
        for row in rules.label_seqs([p.prefix + p.suffix for p in prompts], labels)
    ]
    out = np.zeros((len(prompts), len(labels)), dtype=np.float64)
    # The tokens fed after a prompt: all its labels side by side in the label tree, else
    # one label at a time on a copy of the cache.
    if passes.caps.uses("tree_labels"):
        extra = max(sum(len(s) for s in row) for row in seqs)
    else:
        extra = max(len(s) for row in seqs for s in row)
    for batch in passes.run(planner, prompts, "label likelihoods", extra=extra, passes=2):
        rows = [seqs[it.index] for it in batch.items]
        scores = score_continuations(passes, batch, rows, dtype)
        if normalize:
            scores = scores / torch.tensor([[len(s) for s in row] for row in rows])
        out[[it.index for it in batch.items]] = scores.double().numpy()
        del batch
    return out


def score_continuations(
    passes: ForwardPasses, batch: Batch, rows: list[list[list[int]]], dtype: torch.dtype
) -> torch.Tensor:
    """Sum of log-probabilities of each continuation after each row's prompt: (B, L)."""
    n_labels = len(rows[0])
    first_lp = torch.log_softmax(batch.last_logits.float(), dim=-1)
    index = torch.tensor([[s[0] for s in row] for row in rows], device=passes.device)
    scores = first_lp.gather(1, index).cpu()
    del first_lp
    if all(len(s) == 1 for row in rows for s in row):
        return scores
    if passes.caps.uses("tree_labels"):
        return scores + score_tree(passes, batch, rows, dtype)
    rest = torch.zeros_like(scores)
    for j in range(n_labels):
        rest[:, j] = score_one_label(passes, batch, [row[j] for row in rows])
    return scores + rest


def _tree_layout(rows: list[list[list[int]]], pad_id: int):
    """Each row's labels (but their last token) side by side: ids, next-token targets,
    the label each position belongs to (-1: padding) and its offset in the label."""
    n_rows = len(rows)
    width = max(sum(len(s) - 1 for s in row) for row in rows)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
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
    return ids, target, segment, offset


def score_tree(
    passes: ForwardPasses, batch: Batch, rows: list[list[list[int]]], dtype: torch.dtype
) -> torch.Tensor:
    """All labels of all rows in one forward: each row's labels (but their last token)
    are laid side by side after its prompt; a 4D mask lets each label's tokens see the
    prompt and the label's earlier tokens only, and positions restart at each label."""
    n_rows, n_labels = len(rows), len(rows[0])
    ids, target, segment, offset = _tree_layout(rows, passes.pad_id)
    width = ids.shape[1]
    q = torch.arange(width)
    same = (segment[:, :, None] == segment[:, None, :]) & (q[None, :, None] >= q[None, None, :])
    same |= torch.eye(width, dtype=torch.bool)[None]  # padding attends to itself
    allowed = torch.cat([batch.mask.bool().cpu()[:, None, :].expand(-1, width, -1), same], dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    positions = batch.next_pos.cpu()[:, None] + offset
    device = passes.device
    logits, _ = passes.forward(
        ids.to(device), mask[:, None].to(device), positions.to(device), batch.cache, keep_last=False
    )
    passes.stats["label_tokens"] += int((segment >= 0).sum())
    target = target.to(device)
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


def score_one_label(passes: ForwardPasses, batch: Batch, seqs: list[list[int]]) -> torch.Tensor:
    """Tokens 2.. of one label per row, fed on a copy of the batch cache: (B,)."""
    n_rows = len(seqs)
    width = max(len(s) - 1 for s in seqs)
    if width == 0:
        return torch.zeros(n_rows)
    ids = torch.full((n_rows, width), passes.pad_id, dtype=torch.long)
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
    device = passes.device
    logits, _ = passes.forward(
        ids.to(device), mask.to(device), positions.to(device), cache, keep_last=False
    )
    passes.stats["label_tokens"] += int(real.sum())
    logits = logits.float()
    lp = logits.gather(2, target.to(device)[..., None]).squeeze(-1) - logits.logsumexp(-1)
    return (lp.cpu() * real).sum(1)
