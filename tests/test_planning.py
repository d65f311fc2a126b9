"""The batch planner under a sliding window: a prompt reuses its prefix only when its
whole row (the prompt and every token fed after it) fits the window; the others are fed
whole. (That this is exact, and that dropping the condition is not, is shown by the
conformance matrix: tests/test_conformance.py.)"""

from __future__ import annotations

from collections import Counter

import pytest

from emoprompt.inference import capabilities
from emoprompt.inference.planning import BatchPlanner
from emoprompt.inference.tokens import TokenizerRules
from emoprompt.prompting.render import PromptParts

PREFIX = "Eres un experto en emociones. Clasifica el tweet en una de siete categorías.\n"
TWEETS = ["hola", "qué día tan bonito hace hoy en la ciudad, me encanta", "no"]


def planner(tokenizer, window):
    return BatchPlanner(
        rules=TokenizerRules(tokenizer),
        stats=Counter(fallbacks=0),
        shares_prefix=lambda prefix, width: False,
        batch_size=16,
        max_batch_tokens=10**9,
        pass_cost_tokens=32,
        window=window,
    )


def fed(groups):
    """index -> (reuses a prefix, the tokens fed for it in all)"""
    return {it.index: (bool(g.prefix_ids), g.prefix_ids + it.ids) for g in groups for it in g.items}


@pytest.mark.parametrize("extra", [0, 10])
def test_only_prompts_that_fit_the_window_reuse_their_prefix(llama3_tokenizer, extra):
    prompts = [PromptParts(PREFIX, tweet) for tweet in TWEETS]
    full = fed(planner(llama3_tokenizer, None).plan(prompts, extra))
    lengths = {i: len(ids) for i, (_, ids) in full.items()}
    assert all(reuse for reuse, _ in full.values())  # no window: every prompt reuses
    window = sorted(lengths.values())[1] + extra  # the two shorter rows fit, exactly
    plan = planner(llama3_tokenizer, window)
    groups = plan.plan(prompts, extra)
    got = fed(groups)
    for i, (reuse, ids) in got.items():
        assert ids == full[i][1]  # the same tokens, split or not
        assert reuse == (lengths[i] + extra <= window)
    assert sum(reuse for reuse, _ in got.values()) == 2
    assert plan.stats["outside_window"] == 1
    # a batch never mixes the two: every batch of the prefix group fits the window
    for group in groups:
        for batch in plan.batches_of(group, extra, 1):
            if group.prefix_ids:
                assert len(group.prefix_ids) + max(len(it.ids) for it in batch) + extra <= window


def test_a_window_no_prompt_fits_feeds_every_prompt_whole(llama3_tokenizer):
    prompts = [PromptParts(PREFIX, tweet) for tweet in TWEETS]
    groups = planner(llama3_tokenizer, 8).plan(prompts, 0)
    assert [bool(g.prefix_ids) for g in groups] == [False]
    assert len(groups[0].items) == len(TWEETS)


def test_the_window_is_the_narrowest_of_the_model(tiny_llama):
    from transformers import AutoConfig

    model, _ = tiny_llama
    assert capabilities.attention_window(model) is None  # full attention

    class Wrapped:  # a model whose config has windowed layers
        def __init__(self, config):
            self.config = config

    mixed = AutoConfig.for_model(
        "gemma3_text",
        num_hidden_layers=2,
        sliding_window=512,
        layer_types=["sliding_attention", "full_attention"],
    )
    assert capabilities.attention_window(Wrapped(mixed)) == 512
    full = AutoConfig.for_model("mistral", sliding_window=None)
    assert capabilities.attention_window(Wrapped(full)) is None
