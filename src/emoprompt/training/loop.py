"""The training loop: optimizer and schedule, one step, progress, checkpoints."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emoprompt.training.checkpoints import TrainingState
from emoprompt.training.dataset import IGNORE, Example, collate
from emoprompt.training.frozen import padded, top_layers
from emoprompt.training.settings import FinetuneSettings

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 60  # a progress line in the log this often


def answer_loss(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    weights: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (each weighted by its tweet's weight).

    ``inputs_embeds`` replaces the token ids as the decoder's input (the frozen bottom
    layers' output, :mod:`emoprompt.training.frozen`).

    The output layer runs only at the positions that predict an answer token
    (``logits_to_keep`` with a boolean mask), which saves most of a step's cost.

    With ``candidates`` (the first token of each answer label, in class order) the loss
    is a classifier's over the answers: at the position that predicts the answer's
    first token, a softmax over the candidates' logits only, which is exactly the
    choice ``finetuned_first_token`` makes when it evaluates the adapter.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE  # position t predicts token t+1
    if candidates is not None:  # only the first answer token of each row
        first = predicts.int().argmax(dim=1)
        predicts = torch.zeros_like(predicts)
        predicts[torch.arange(len(first)), first] = True
    targets = labels[:, 1:][predicts[:, :-1]]
    inputs = {"input_ids": ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    try:
        logits = model(
            **inputs, attention_mask=mask, logits_to_keep=predicts, use_cache=False
        ).logits
    except TypeError:  # a model without logits_to_keep: all positions, then select
        logits = model(**inputs, attention_mask=mask, use_cache=False).logits[predicts]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if candidates is not None:
        logits = logits[:, candidates]
        targets = (targets[:, None] == candidates[None, :]).int().argmax(dim=1)
    losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    if weights is None:
        return losses.mean()
    if candidates is not None:
        return (losses * weights).sum() / weights.sum()
    token_weights = weights[:, None].expand_as(labels)[:, 1:][predicts[:, :-1]]
    return (losses * token_weights).sum() / token_weights.sum()


def first_answer_tokens(
    examples: Sequence[Example], answers: Sequence[str], first_of: Mapping[str, int]
) -> torch.Tensor:
    """The first token of each answer label (in ``answers`` order) as the evaluation
    scores it (``first_of``: answer -> token, from the tokenizer's rules), checked against
    every training example; the answers must start with distinct tokens."""
    for e in examples:
        token = next(t for t in e.labels if t != IGNORE)
        if first_of[e.answer] != token:
            raise ValueError(
                f"tweet {e.id}: its answer {e.answer!r} starts with token {token}, "
                f"not {first_of[e.answer]} as the evaluation scores it"
            )
    ids = [first_of[a] for a in answers]
    if len(set(ids)) != len(ids):
        raise ValueError("two answer labels start with the same token: use loss 'answer'")
    return torch.tensor(ids, dtype=torch.long)


def lr_schedule(total: int, warmup: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        return max(0.0, 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span))))

    return factor


@dataclass
class Optimisation:
    """The model being trained and what updates it."""

    model: Any
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    autocast: bool  # bfloat16 autocast of the forward and backward passes
    candidates: torch.Tensor | None = None  # loss "labels": the answers' first tokens
    # The frozen bottom layers' output per example, and how many layers that is (0: none).
    frozen: list[torch.Tensor] | None = None
    frozen_depth: int = 0

    def _decoder(self):
        """The layers a step runs: all, or those above the frozen ones."""
        if self.frozen is None:
            return contextlib.nullcontext()
        return top_layers(self.model, self.frozen_depth)

    @classmethod
    def of(
        cls, model: Any, settings: FinetuneSettings, total_steps: int, quantization: str
    ) -> Optimisation:
        device = next(model.parameters()).device
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        warmup = round(settings.warmup_ratio * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(total_steps, warmup))
        from emoprompt.models.loading import bf16_autocast

        autocast = bf16_autocast(settings.autocast, device.type, quantization)
        return cls(model, trainable, optimizer, scheduler, device, autocast)

    def step(
        self, examples: Sequence[Example], weights: torch.Tensor, micro: list[list[int]], pad: int
    ) -> float:
        """One optimizer step over the micro-batches ``micro``; the mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for rows in micro:
            batch = {
                k: v.to(self.device) for k, v in collate([examples[i] for i in rows], pad).items()
            }
            with (
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast),
                self._decoder(),
            ):
                loss = answer_loss(
                    self.model,
                    batch,
                    weights[rows].to(self.device),
                    None if self.candidates is None else self.candidates.to(self.device),
                    None if self.frozen is None else padded([self.frozen[i] for i in rows]),
                )
            (loss / len(micro)).backward()
            step_loss += loss.item() / len(micro)
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return step_loss


@dataclass
class Plan:
    """What the loop runs: the examples, their loss weights, the batch order."""

    examples: list[Example]
    weights: torch.Tensor
    batches: list[list[int]]
    total_steps: int
    pad_id: int


def run_steps(
    opt: Optimisation,
    state: TrainingState,
    plan: Plan,
    settings: FinetuneSettings,
    checkpoint_dir: Path,
    desc: str,
) -> None:
    """Train from ``state.step`` to ``plan.total_steps``, checkpointing on the way and at
    the end; ``state`` is updated in place."""
    from tqdm.auto import tqdm

    opt.model.train()
    last_checkpoint = last_report = time.monotonic()
    bar = tqdm(
        total=plan.total_steps,
        initial=state.step,
        desc=desc,
        unit="step",
        mininterval=5.0,
        file=sys.stderr,
    )
    accumulation = settings.gradient_accumulation
    while state.step < plan.total_steps:
        tick = time.perf_counter()
        first = state.step * accumulation
        lr = opt.scheduler.get_last_lr()[0]
        loss = opt.step(
            plan.examples, plan.weights, plan.batches[first : first + accumulation], plan.pad_id
        )
        state.step += 1
        state.seconds += time.perf_counter() - tick
        state.history.append(
            {
                "step": state.step,
                "loss": round(loss, 6),
                "lr": lr,
                "seconds": round(state.seconds, 3),
            }
        )
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if time.monotonic() - last_report >= PROGRESS_SECONDS:  # a plain line for the log
            last_report = time.monotonic()
            _log_progress(state, plan.total_steps)
        due = (time.monotonic() - last_checkpoint) >= settings.checkpoint_minutes * 60
        if settings.checkpoint_steps and state.step % settings.checkpoint_steps == 0:
            due = True
        if due and state.step < plan.total_steps:
            checkpoint(opt, state, checkpoint_dir, plan.total_steps)
            last_checkpoint = time.monotonic()
    bar.close()
    checkpoint(opt, state, checkpoint_dir, plan.total_steps)


def _log_progress(state: TrainingState, total_steps: int) -> None:
    recent = [h["loss"] for h in state.history[-10:]]
    log.info(
        "step %d/%d (%.0f%%): loss %.4f (mean of the last %d), %.0f s, ETA %.0f s",
        state.step,
        total_steps,
        100 * state.step / total_steps,
        float(np.mean(recent)),
        len(recent),
        state.seconds,
        state.seconds / state.step * (total_steps - state.step),
    )


def checkpoint(opt: Optimisation, state: TrainingState, folder: Path, total_steps: int) -> None:
    state.save(folder, opt.model, opt.optimizer, opt.scheduler)
    step, seconds = state.step, state.seconds
    left = seconds / step * (total_steps - step) if step else float("nan")
    log.info(
        "checkpoint at step %d/%d (loss %.4f, %.0f s trained, about %.0f s left)",
        step,
        total_steps,
        state.history[-1]["loss"] if state.history else float("nan"),
        seconds,
        left,
    )
