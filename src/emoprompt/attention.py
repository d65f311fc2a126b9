"""Attention over a prompt prefix that every row of a batch shares.

When a batch continues one cached prefix (the system prompt and few-shot turns), the
first ``P`` key/value positions are the same in every row and every query sees all of
them. :class:`SharedPrefixLayer` keeps them once for the whole batch (a plain cache
would hold one copy per row), and :func:`shared_prefix_attention` attends to them
once for all rows, as one unmasked attention per key/value head with every row's
queries stacked, then to each row's own positions with its mask, and merges the two
softmax parts exactly through their log-sum-exp. The result equals attention over
the full keys; on a CPU it is faster (no mask over the prefix, no per-row copies) and
the cache no longer grows with rows x prefix length.

The engine registers the function with transformers under :data:`IMPLEMENTATION`,
builds the batch's cache from :class:`SharedPrefixLayer` and names that cache for the
duration of a forward pass (:func:`shared_prefix`). Layers of any other kind, and calls
outside such a pass, go to transformers' SDPA attention unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

IMPLEMENTATION = "emoprompt_shared_prefix"
_CACHE: contextvars.ContextVar[Any] = contextvars.ContextVar("shared_prefix_cache", default=None)


class SharedPrefixLayer(DynamicLayer):
    """A cache layer whose first positions, a prefix common to all rows, are stored once.

    ``keys``/``values`` hold each row's own positions, (B, Hkv, S, D); ``prefix_keys``
    and ``prefix_values`` the shared ones, (1, Hkv, P, D). Its length counts both, so
    masks and positions are those of the full sequence.
    """

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, rows: int):
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        shape = (rows, prefix_keys.shape[1], 0, prefix_keys.shape[-1])
        self.keys = prefix_keys.new_empty(shape)
        self.values = prefix_values.new_empty(shape)
        self.device = prefix_keys.device
        self.is_initialized = True

    @property
    def prefix_length(self) -> int:
        return self.prefix_keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.prefix_length + self.keys.shape[-2]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a shared-prefix cache is not cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a shared-prefix cache is built for its rows")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a shared-prefix cache is built for its rows")


@contextlib.contextmanager
def shared_prefix(cache: Any) -> Iterator[None]:
    """Within the block, attention reads shared prefixes from ``cache``'s layers."""
    token = _CACHE.set(cache)
    try:
        yield
    finally:
        _CACHE.reset(token)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` (B, H, Q, D); ``key`` and
    ``value`` (B, Hkv, K, D), only the rows' own positions when the layer's cache is a
    :class:`SharedPrefixLayer`; ``attention_mask`` boolean (True: may attend) or
    additive, over prefix + own positions. Returns the output as (B, Q, H, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cache = _CACHE.get()
    index = getattr(module, "layer_idx", None)
    layer = None
    if cache is not None and index is not None and index < len(cache.layers):
        layer = cache.layers[index]
    if not isinstance(layer, SharedPrefixLayer):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("shared-prefix attention has no dropout, softcap or bias")
    length = layer.prefix_length
    rows, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # Query heads of one key/value head side by side: (B, Hkv, G*Q, D).
    grouped = query.reshape(rows, kv_heads, groups * q_len, dim)

    # The shared part: every row's queries stacked against the one copy of the prefix,
    # (1, Hkv, B*G*Q, D) x (1, Hkv, P, D), with no mask (all of it is visible).
    stacked = grouped.transpose(0, 1).reshape(1, kv_heads, rows * groups * q_len, dim)
    out_pre, lse_pre = flash(stacked, layer.prefix_keys, layer.prefix_values, scale=scale)
    out_pre = out_pre.reshape(kv_heads, rows, groups * q_len, dim).transpose(0, 1)
    lse_pre = lse_pre.reshape(kv_heads, rows, groups * q_len).transpose(0, 1)

    # Each row's own positions, with its mask (padding, causality, label trees).
    mask = None
    if attention_mask is not None:
        mask = attention_mask[..., length:].expand(rows, -1, q_len, -1)  # (B, 1|H, Q, S)
        if mask.shape[1] == 1:
            mask = mask.repeat(1, 1, groups, 1)
        mask = mask.reshape(rows, -1, groups * q_len, mask.shape[-1])
        if mask.dtype == torch.bool:
            mask_bool = mask
            # A very negative number, not -inf: a padding query that sees none of its
            # own keys then gets a finite (and negligible) share instead of NaN.
            floor = torch.finfo(query.dtype).min
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
            mask = mask.masked_fill_(~mask_bool, floor)
        else:
            mask = mask.to(query.dtype)
    out_own, lse_own = flash(grouped, key, value, attn_mask=mask, scale=scale)

    # softmax over [prefix, own] = the two parts weighted by their share of the mass.
    lse = torch.logaddexp(lse_pre, lse_own)
    out = out_pre * torch.exp(lse_pre - lse)[..., None] + out_own * torch.exp(lse_own - lse)[
        ..., None
    ].to(out_own.dtype)
    out = out.reshape(rows, heads, q_len, dim).transpose(1, 2).contiguous()
    return out.to(query.dtype), None


def register() -> str:
    """Make :data:`IMPLEMENTATION` known to transformers (attention and mask); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, shared_prefix_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return IMPLEMENTATION
