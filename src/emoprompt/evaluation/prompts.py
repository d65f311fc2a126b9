"""Every tweet's prompt for a strategy, and the record of what was asked."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import pandas as pd

from emoprompt.evaluation.strategies import Strategy
from emoprompt.prompting.fewshot import select_shots
from emoprompt.prompting.prompt_file import PromptFile
from emoprompt.prompting.render import PromptParts, prompt_record, prompt_sha256, render


def build_prompts(
    strategy: Strategy,
    prompt: PromptFile,
    tokenizer: Any,
    train: pd.DataFrame,
    sample: pd.DataFrame,
    template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[PromptParts], dict[str, Any]]:
    """Every tweet's prompt, and a record of what was asked (messages, shots, digest)."""
    if prompt.format == "plain":
        parts = [render(prompt, tweet) for tweet in sample["tweet"]]
        template = prompt.settings["template"]
        return parts, {"template": template, "prompt_sha256": prompt_sha256(template)}
    shots_of: dict[str, list[tuple[str, str]]] = {}
    record: dict[str, Any] = {}
    if strategy.family == "few_shot":
        settings = prompt.settings
        plan = select_shots(
            train,
            sample,
            method=settings["selection"],
            n=settings["shots"],
            seed=settings.get("seed", 0),
            manual_ids=settings.get("manual_ids", ()),
        )
        by_id = train.set_index("id")
        order = settings.get("shot_order")  # a family's variant: the shots shuffled
        for test_id in sample["id"]:
            ids = shuffled(plan.ids_for(test_id), order)
            shots_of[test_id] = [(by_id.at[i, "tweet"], by_id.at[i, "label"]) for i in ids]
        record["few_shot"] = {
            "method": settings["selection"],
            "n": settings["shots"],
            "seed": settings.get("seed", 0),
            **({"shot_order": order} if order is not None else {}),
            "ids": plan.shared,
            "per_tweet_ids": plan.per_tweet,
        }
    parts = [
        render(
            prompt,
            tweet,
            tokenizer,
            shots=shots_of.get(test_id, ()),
            template_kwargs=template_kwargs,
        )
        for test_id, tweet in zip(sample["id"], sample["tweet"], strict=True)
    ]
    first_id = sample["id"].iloc[0]
    asked = prompt_record(prompt, shots_of.get(first_id, ()))  # the messages, or the text
    record.update(asked, prompt_sha256=prompt_sha256(next(iter(asked.values()))))
    return parts, record


def shuffled(ids: list[str], seed: int | None) -> list[str]:
    """``ids`` in the order a seeded shuffle gives (as they are for ``None``)."""
    if seed is None:
        return ids
    ids = list(ids)
    random.Random(seed).shuffle(ids)
    return ids


def content_free_prompt(strategy, prompt, tokenizer, train, sample, text, settings):
    """The strategy's prompt with a content-free tweet (same shots as the first tweet)."""
    stand_in = sample.iloc[:1].assign(tweet=text)
    parts, _ = build_prompts(
        strategy, prompt, tokenizer, train, stand_in, settings.chat_template_kwargs
    )
    return parts[0]
