"""Shared-prefix attention equals attention over the full keys, and the engine uses it."""

from __future__ import annotations

import types

import pytest
import torch

from emoprompt.inference.attention import (
    SharedPrefixLayer,
    shared_prefix,
    shared_prefix_attention,
)
from emoprompt.inference.engine import Engine
from emoprompt.labels import LABELS

ROWS, HEADS, KV_HEADS, DIM = 3, 6, 2, 8


def full_attention(query, prefix_k, prefix_v, own_k, own_v, mask):
    """Reference: SDPA over [prefix copied per row, own keys], heads repeated for GQA."""
    rows, groups = query.shape[0], query.shape[1] // own_k.shape[1]
    keys = torch.cat([prefix_k.expand(rows, -1, -1, -1), own_k], dim=2)
    values = torch.cat([prefix_v.expand(rows, -1, -1, -1), own_v], dim=2)
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
    return out.transpose(1, 2)


def tensors(q_len, prefix, own, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(ROWS, HEADS, q_len, DIM, generator=gen),
        torch.randn(1, KV_HEADS, prefix, DIM, generator=gen),
        torch.randn(1, KV_HEADS, prefix, DIM, generator=gen),
        torch.randn(ROWS, KV_HEADS, own, DIM, generator=gen),
        torch.randn(ROWS, KV_HEADS, own, DIM, generator=gen),
    )


def shared(query, prefix_k, prefix_v, own_k, own_v, mask):
    layer = SharedPrefixLayer(prefix_k, prefix_v, ROWS)
    module = types.SimpleNamespace(layer_idx=0, num_key_value_groups=HEADS // KV_HEADS)
    with shared_prefix(types.SimpleNamespace(layers=[layer])):
        out, _ = shared_prefix_attention(module, query, own_k, own_v, mask)
    return out


def padded_causal_mask(prefix, own, q_len, pads=(0, 2, 4)):
    """Boolean (B, 1, Q, P+S): all of the prefix, own keys causally, left padding."""
    mask = torch.ones(ROWS, 1, q_len, prefix + own, dtype=torch.bool)
    causal = torch.ones(q_len, own, dtype=torch.bool).tril(diagonal=own - q_len)
    mask[..., prefix:] = causal
    for row, pad in enumerate(pads):
        mask[row, :, :, prefix : prefix + pad] = False
    return mask


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_equals_full_attention_with_padding_and_causality(kind):
    q_len, prefix, own = 5, 11, 5
    args = tensors(q_len, prefix, own)
    mask = padded_causal_mask(prefix, own, q_len)
    if kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    expected = full_attention(*args, mask)
    got = shared(*args, mask)
    assert got.shape == (ROWS, q_len, HEADS, DIM)
    # Padding queries see no own key: only their output may differ (it is never used).
    real = padded_causal_mask(prefix, own, q_len)[:, 0, :, prefix:].any(-1)  # (B, Q)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_decoding_step_without_a_mask():
    args = tensors(1, 9, 4, seed=1)
    torch.testing.assert_close(shared(*args, None), full_attention(*args, None), atol=1e-5, rtol=0)


def test_other_layers_and_calls_outside_a_pass_are_plain_sdpa():
    query, prefix_k, prefix_v, own_k, own_v = tensors(3, 4, 3, seed=2)
    keys = torch.cat([prefix_k.expand(ROWS, -1, -1, -1), own_k], 2)
    values = torch.cat([prefix_v.expand(ROWS, -1, -1, -1), own_v], 2)
    module = types.SimpleNamespace(
        layer_idx=0, num_key_value_groups=HEADS // KV_HEADS, is_causal=False
    )
    out, _ = shared_prefix_attention(module, query, keys, values, None)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(3, 1), values.repeat_interleave(3, 1), is_causal=False
    )
    assert out.shape == (ROWS, 3, HEADS, DIM)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=0)


def test_layer_counts_the_prefix_and_stores_it_once():
    _, prefix_k, prefix_v, own_k, own_v = tensors(1, 7, 4)
    layer = SharedPrefixLayer(prefix_k, prefix_v, ROWS)
    assert layer.get_seq_length() == 7
    keys, values = layer.update(own_k, own_v)
    assert keys.shape == values.shape == (ROWS, KV_HEADS, 4, DIM)
    assert layer.get_seq_length() == 11
    assert layer.get_mask_sizes(2) == (13, 0)
    assert layer.prefix_keys.shape[0] == 1


def test_second_engine_on_a_model_keeps_the_fast_paths(tiny_llama):
    """The first engine switches the model to the shared-prefix attention; later engines
    must still recognise it as SDPA underneath (label trees, shared prefixes)."""
    model, tokenizer = tiny_llama
    from test_engine import mixed_prompts

    prompts = mixed_prompts(tokenizer)
    first = Engine(model, tokenizer, batch_size=4, progress=False)
    second = Engine(model, tokenizer, batch_size=4, progress=False)
    assert second.capabilities.uses("shared_attention") and second.capabilities.uses("tree_labels")
    torch.testing.assert_close(
        torch.from_numpy(second.label_logprobs(prompts, LABELS)),
        torch.from_numpy(first.label_logprobs(prompts, LABELS)),
    )


def test_layers_with_different_prefixes_in_one_pass():
    """The own-part mask is converted once per pass and reused by later layers: a layer
    with another prefix length must not get the first layer's conversion."""
    q_len, own = 4, 4
    first, second = tensors(q_len, 6, own, seed=3), tensors(q_len, 9, own, seed=4)
    layers = [SharedPrefixLayer(first[1], first[2], ROWS), SharedPrefixLayer(*second[1:3], ROWS)]
    masks = [padded_causal_mask(6, own, q_len), padded_causal_mask(9, own, q_len)]
    with shared_prefix(types.SimpleNamespace(layers=layers)):
        got = [
            shared_prefix_attention(
                types.SimpleNamespace(layer_idx=i, num_key_value_groups=HEADS // KV_HEADS),
                args[0],
                args[3],
                args[4],
                mask,
            )[0]
            for i, (args, mask) in enumerate(zip((first, second), masks, strict=True))
        ]
    for args, mask, out in zip((first, second), masks, got, strict=True):
        real = mask[:, 0, :, -own:].any(-1)
        torch.testing.assert_close(out[real], full_attention(*args, mask)[real], atol=1e-5, rtol=0)
