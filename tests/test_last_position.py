"""Narrowed forward passes give the plain pass's last-position logits and cache."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from emoprompt.inference.engine import Engine
from emoprompt.inference.last_position import (
    head_columns,
    last_layer,
    last_position_only,
    narrowing_agrees,
    output_head,
)
from emoprompt.labels import LABELS


def padded_batch(tokenizer, texts):
    """Left-padded ids, mask and positions counting real tokens only."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(row)
        mask[r, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=ids, attention_mask=mask, position_ids=positions)


TEXTS = ["Hoy es un gran día, ¡por fin ganamos!", "ok", "Tengo miedo de lo que viene"]


@torch.inference_mode()
def test_narrowed_pass_gives_the_last_logits_and_the_whole_cache(tiny_llama):
    model, tokenizer = tiny_llama
    batch = padded_batch(tokenizer, TEXTS)
    layer, head = last_layer(model), output_head(model)
    assert layer is model.model.layers[-1] and head is model.lm_head
    columns = torch.tensor([5, 900, 17, 128000])

    plain = model(**batch, use_cache=True)
    with last_position_only(layer), head_columns(head, columns):
        narrowed = model(**batch, use_cache=True)

    assert narrowed.logits.shape[-1] == len(columns)
    torch.testing.assert_close(narrowed.logits[:, -1], plain.logits[:, -1, columns])
    caches = [getattr(out, "cache", None) or out.past_key_values for out in (narrowed, plain)]
    for mine, theirs in zip(caches[0].layers, caches[1].layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys)
        torch.testing.assert_close(mine.values, theirs.values)
    # The hooks and the head's override are gone after the block.
    again = model(**batch)
    torch.testing.assert_close(again.logits, plain.logits)
    assert "forward" not in vars(head)


class _MixesPositions(torch.nn.Module):
    """An MLP that is not position-wise: each position sees the sum of those before it."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, hidden):
        return self.mlp(hidden.cumsum(1))


def test_narrowing_is_refused_where_it_would_change_the_logits(tiny_llama, caplog):
    model, tokenizer = tiny_llama
    ids = torch.tensor(
        [tokenizer("Hola, ¿qué tal estás hoy?", add_special_tokens=False)["input_ids"]]
    )
    assert narrowing_agrees(model, last_layer(model), output_head(model), ids)

    odd = copy.deepcopy(model)
    odd.model.layers[-1].mlp = _MixesPositions(odd.model.layers[-1].mlp)
    assert not narrowing_agrees(odd, last_layer(odd), output_head(odd), ids)
    with caplog.at_level(logging.WARNING, logger="emoprompt.inference.capabilities"):
        engine = Engine(odd, tokenizer, progress=False)
    assert engine.capabilities.last_layer is None
    assert "narrowing" in caplog.text


def test_layers_of_other_layouts_are_not_narrowed(tiny_llama):
    model, _ = tiny_llama
    assert last_layer(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None
    gemma_like = copy.deepcopy(model)
    gemma_like.model.layers[-1].pre_feedforward_layernorm = torch.nn.Identity()
    assert last_layer(gemma_like) is None
    assert output_head(torch.nn.Linear(2, 2)) is None  # no get_output_embeddings


@pytest.mark.parametrize("head", ["narrowed", "whole vocabulary"])
def test_first_token_scores_do_not_depend_on_the_narrowing(tiny_llama, head):
    """The engine's first-token scores with every narrowing, and with none."""
    from test_engine import mixed_prompts

    model, tokenizer = tiny_llama
    prompts = mixed_prompts(tokenizer)
    off = {"label_head"} if head == "whole vocabulary" else set()
    narrowed = Engine(model, tokenizer, batch_size=4, disable=off, progress=False)
    assert narrowed.capabilities.last_layer is not None
    assert (narrowed.capabilities.head is None) == bool(off)
    plain = Engine(
        model, tokenizer, batch_size=4, disable={"label_head", "last_layer"}, progress=False
    )
    np.testing.assert_allclose(
        narrowed.first_token_probs(prompts, LABELS),
        plain.first_token_probs(prompts, LABELS),
        atol=1e-5,
        rtol=0,
    )
    assert "forward" not in vars(model.lm_head)


def test_head_columns_keeps_a_wrapper_the_head_had():
    """A forward set on the instance (as accelerate's hooks do) is put back afterwards."""
    head = torch.nn.Linear(4, 10)
    calls = []

    def wrapped(hidden):
        calls.append(1)
        return torch.nn.Linear.forward(head, hidden)

    head.forward = wrapped
    with head_columns(head, torch.tensor([3, 1])):
        assert head(torch.ones(1, 4)).shape == (1, 2)
    assert vars(head)["forward"] is wrapped
    assert head(torch.ones(1, 4)).shape == (1, 10) and calls == [1]
