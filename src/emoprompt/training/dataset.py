"""The training data: which tweets train, with which answer, as which tokens.

* :func:`label_scheme` / :func:`select_training_set` - which tweets train and with which
  answer: the whole split or a seeded subset (stratified, or class-balanced), never a
  tweet of the validation or test split;
* :func:`build_examples` - each tweet as ``prompt + answer + end token`` with a loss mask
  that covers the answer and the end token only. The prompt is the one the evaluation
  strategies write (the plain ``### Texto:`` template, or the model's chat template with
  the zero-shot prompt), tokenised by the engine's own rules
  (:class:`emoprompt.inference.tokens.TokenizerRules`);
* :func:`collate` / :func:`plan_batches` - padded batches in a deterministic order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from emoprompt.inference.tokens import TokenizerRules
from emoprompt.labels import LABELS
from emoprompt.prompting.prompt_file import PromptFile
from emoprompt.prompting.render import prompt_record, render

log = logging.getLogger(__name__)

IGNORE = -100  # label of a position that the loss does not see


def label_scheme(
    label_set: str, notebook_prompt: PromptFile | None = None
) -> tuple[tuple[str, ...], dict[str, str]]:
    """The answer labels and how each maps to one of the seven classes.

    ``seven``: the seven classes themselves. ``notebook``: the published fine-tuned
    model's labels from prompts/finetuned.yaml (six, Neutral standing for Otras).
    """
    if label_set == "seven":
        return LABELS, {label: label for label in LABELS}
    if label_set == "notebook":
        if notebook_prompt is None:
            raise ValueError("label_set 'notebook' needs the fine-tuned prompt file")
        return notebook_prompt.labels, notebook_prompt.label_map
    raise ValueError(f"unknown label set {label_set!r}; expected one of {', '.join(LABELS)}")


def answer_for_class(labels: Sequence[str], label_map: Mapping[str, str]) -> dict[str, str]:
    """Class -> the answer that trains it (classes without a label are not trained)."""
    answers: dict[str, str] = {}
    for label in labels:
        answers.setdefault(label_map[label], label)
    return answers


def _allocate(counts: Mapping[str, int], size: int, balanced: bool) -> dict[str, int]:
    """How many tweets each class contributes to a subset of ``size``.

    Stratified: proportional to the class sizes (largest remainders). Balanced: as equal
    as the classes allow (a class smaller than its share gives all it has, the rest is
    shared among the others).
    """
    total = sum(counts.values())
    if size >= total:
        return dict(counts)
    if balanced:
        take = dict.fromkeys(counts, 0)
        left, open_classes = size, sorted(counts, key=lambda c: counts[c])
        while open_classes and left > 0:
            share = left // len(open_classes)
            smallest = open_classes[0]
            if counts[smallest] <= share:
                take[smallest] = counts[smallest]
                left -= counts[smallest]
                open_classes.pop(0)
                continue
            for c in open_classes:
                take[c] = share
            left -= share * len(open_classes)
            for c in sorted(open_classes)[:left]:  # the remainder, one each, by name
                take[c] += 1
            break
        return take
    exact = {c: n * size / total for c, n in counts.items()}
    take = {c: math.floor(v) for c, v in exact.items()}
    rest = size - sum(take.values())
    for c in sorted(exact, key=lambda c: (-(exact[c] - take[c]), c))[:rest]:
        take[c] += 1
    return take


def select_training_set(
    train: pd.DataFrame,
    *,
    exclude_ids: Sequence[str] = (),
    classes: Sequence[str] = LABELS,
    size: int | str = "all",
    subset: str = "stratified",
    seed: int = 0,
) -> pd.DataFrame:
    """The training tweets: never an id of ``exclude_ids`` (the held-out splits), only
    classes that have an answer; all of them, or a seeded subset of ``size`` (stratified
    by class, or class-balanced). Rows keep the split's order."""
    excluded = set(map(str, exclude_ids))
    keep = ~train["id"].astype(str).isin(excluded) & train["label"].isin(list(classes))
    dropped_test = int(train["id"].astype(str).isin(excluded).sum())
    if dropped_test:
        log.warning("%d training tweets are in a held-out split: left out", dropped_test)
    pool = train[keep]
    if size == "all" or int(size) >= len(pool):
        return pool.reset_index(drop=True)
    counts = pool["label"].value_counts().to_dict()
    take = _allocate(counts, int(size), balanced=subset == "balanced")
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in sorted(take):
        rows = np.flatnonzero(pool["label"].to_numpy() == label)
        chosen += rng.choice(rows, size=take[label], replace=False).tolist()
    return pool.iloc[sorted(chosen)].reset_index(drop=True)


def class_weights(labels: Sequence[str], scheme: str = "none") -> dict[str, float]:
    """A loss weight per class: 1, or inversely proportional to its frequency (``balanced``)
    or to the square root of it (``sqrt``); scaled so that the mean over tweets is 1."""
    counts = pd.Series(list(labels)).value_counts().to_dict()
    if scheme == "none" or not counts:
        return dict.fromkeys(counts, 1.0)
    power = {"balanced": 1.0, "sqrt": 0.5}[scheme]
    raw = {c: (1.0 / n) ** power for c, n in counts.items()}
    mean = sum(raw[c] * n for c, n in counts.items()) / sum(counts.values())
    return {c: raw[c] / mean for c in sorted(counts)}


@dataclass(frozen=True)
class PromptSpec:
    """How a tweet becomes the prompt the evaluation will also write."""

    format: str  # plain | chat
    prompt: PromptFile  # finetuned.yaml (plain) or zero_shot.yaml (chat)
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.prompt.family

    def __post_init__(self) -> None:
        if self.format != self.prompt.format:
            raise ValueError(
                f"prompt format {self.format!r} does not fit {self.prompt.path} "
                f"({self.prompt.family}: {self.prompt.format})"
            )

    def text(self, tokenizer: Any, tweet: str) -> str:
        """The prompt as evaluation writes it (:func:`emoprompt.prompting.render.render`)."""
        return render(self.prompt, tweet, tokenizer, template_kwargs=self.template_kwargs).text

    def record(self) -> dict[str, Any]:
        return prompt_record(self.prompt)


@dataclass(frozen=True)
class Example:
    """One training tweet: its tokens and, per position, the token the loss expects
    (``IGNORE`` on the prompt, the token itself on the answer and end token)."""

    id: str
    label: str  # the class (one of the seven)
    answer: str  # the answer label (may differ from the class: Neutral for Otras)
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def build_example(
    rules: TokenizerRules,
    spec: PromptSpec,
    tweet_id: str,
    tweet: str,
    label: str,
    answer: str,
    *,
    max_length: int,
) -> Example:
    """``prompt + answer + end of turn`` with the loss on ``answer + end`` only.

    Prompt and answer are tokenised by the rules the engine scores with
    (:meth:`TokenizerRules.answer_tokens`). A prompt too long for ``max_length`` has its
    tweet shortened (its end cut, at a character boundary) until it fits; the answer is
    never cut.
    """
    text, truncated = tweet, False
    for _ in range(20):
        prompt = spec.text(rules.tokenizer, text)
        prompt_ids, answer_ids = rules.answer_tokens(prompt, answer)
        excess = len(prompt_ids) + len(answer_ids) - max_length
        if excess <= 0:
            break
        if len(text) <= 1:
            raise ValueError(f"max_length {max_length} is too short for the prompt alone")
        # Drop a share of characters a little above the share of excess tokens.
        tweet_tokens = max(1, len(rules.encode([text])[0]))
        cut = max(1, math.ceil(len(text) * min(1.0, (excess + 1) / tweet_tokens)))
        text, truncated = text[: max(1, len(text) - cut)].rstrip() or text[:1], True
    else:
        raise ValueError(f"could not fit tweet {tweet_id} into {max_length} tokens")
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE] * len(prompt_ids) + answer_ids
    return Example(str(tweet_id), label, answer, input_ids, labels, truncated)


def answer_first_tokens(tokenizer: Any, spec: PromptSpec, answers: Sequence[str]) -> dict[str, int]:
    """Answer -> the first token that evaluation scores it by after a prompt of ``spec``
    (the engine's rule; raises if two answers share it)."""
    firsts = TokenizerRules(tokenizer).label_first_tokens(answers, spec.text(tokenizer, "x"))
    return dict(zip(answers, firsts, strict=True))


def build_examples(
    frame: pd.DataFrame,
    tokenizer: Any,
    spec: PromptSpec,
    answers: Mapping[str, str],
    max_length: int,
) -> list[Example]:
    """Every row of ``frame`` (id, tweet, label) as an :class:`Example`."""
    rules = TokenizerRules(tokenizer)
    examples = [
        build_example(
            rules, spec, row.id, row.tweet, row.label, answers[row.label], max_length=max_length
        )
        for row in frame.itertuples(index=False)
    ]
    truncated = sum(e.truncated for e in examples)
    if truncated:
        log.info(
            "%d of %d tweets shortened to fit max_length %d", truncated, len(examples), max_length
        )
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and loss ``labels``."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        mask[r, :n] = 1
        labels[r, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plan_batches(
    n: int,
    batch_size: int,
    epochs: float,
    seed: int,
    lengths: Sequence[int] | None = None,
    group: int = 16,
) -> list[list[int]]:
    """The order of training: one seeded permutation per epoch, cut into batches (a
    fractional epoch takes the first part of its permutation). Deterministic, so a
    resumed run continues with exactly the batches it had not done.

    With ``lengths``, each run of ``group`` batches of the permutation is sorted by
    length before it is cut, and those batches are shuffled: batches of similar lengths
    waste less on padding, and the order stays random.
    """
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    whole = math.floor(epochs)
    for _ in range(whole):
        order += torch.randperm(n, generator=generator).tolist()
    part = round((epochs - whole) * n)
    if part:
        order += torch.randperm(n, generator=generator).tolist()[:part]
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    span = batch_size * group
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        cut = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        batches += [cut[j] for j in torch.randperm(len(cut), generator=generator).tolist()]
    return batches
