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
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

IMPLEMENTATION = "emoprompt_shared_prefix"
_PASS: contextvars.ContextVar[Any] = contextvars.ContextVar("shared_prefix_pass", default=None)


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


@dataclass
class _Pass:
    """What the layers of one forward pass share: the cache, and the own part of the
    attention mask as the grouped layout needs it (the same for every layer)."""

    cache: Any
    masks: dict[tuple, tuple] = field(default_factory=dict)


@contextlib.contextmanager
def shared_prefix(cache: Any) -> Iterator[None]:
    """Within the block, attention reads shared prefixes from ``cache``'s layers."""
    token = _PASS.set(_Pass(cache))
    try:
        yield
    finally:
        _PASS.reset(token)


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
    return _attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def _attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _PASS.get()
    index = getattr(module, "layer_idx", None)
    layer = None
    if state is not None and index is not None and index < len(state.cache.layers):
        layer = state.cache.layers[index]
    if not isinstance(layer, SharedPrefixLayer):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("shared-prefix attention has no dropout, softcap or bias")
    rows, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    mask, real = _own_mask(state, attention_mask, layer.prefix_length, groups, query)

    # The shared part: the rows' queries stacked against the one copy of the prefix,
    # (1, Hkv, N*G, D) x (1, Hkv, P, D), with no mask (all of it is visible). Padding
    # queries (those that see none of their row's own keys) are left out: nothing reads
    # their output, and on a long prefix they would cost as much as real ones.
    by_position = query.view(rows, kv_heads, groups, q_len, dim).permute(1, 0, 3, 2, 4)
    if real is None:
        picked = by_position.reshape(kv_heads, rows * q_len, groups, dim)
    else:
        picked = by_position[:, real]  # (Hkv, N, G, D)
    count = picked.shape[1]
    out_pre, lse_pre = flash(
        picked.reshape(1, kv_heads, count * groups, dim),
        layer.prefix_keys,
        layer.prefix_values,
        scale=scale,
    )
    out_pre = out_pre.reshape(kv_heads, count, groups, dim)
    lse_pre = lse_pre.reshape(kv_heads, count, groups)
    if real is not None:  # back to every position: padding gets no share of the prefix
        out_all = out_pre.new_zeros(kv_heads, rows, q_len, groups, dim)
        lse_all = lse_pre.new_full((kv_heads, rows, q_len, groups), -math.inf)
        out_all[:, real], lse_all[:, real] = out_pre, lse_pre
        out_pre, lse_pre = out_all, lse_all
    # (B, Hkv, G, Q, ...), the layout of the own part's grouped queries.
    out_pre = out_pre.reshape(kv_heads, rows, q_len, groups, dim).permute(1, 0, 3, 2, 4)
    lse_pre = lse_pre.reshape(kv_heads, rows, q_len, groups).permute(1, 0, 3, 2)

    # Each row's own positions, with its mask (padding, causality, label trees): the
    # query heads of one key/value head side by side, (B, Hkv, G*Q, D).
    grouped = query.reshape(rows, kv_heads, groups * q_len, dim)
    out_own, lse_own = flash(grouped, key, value, attn_mask=mask, scale=scale)
    out_own = out_own.unflatten(2, (groups, q_len))
    lse_own = lse_own.unflatten(2, (groups, q_len))

    # softmax over [prefix, own] = the two parts weighted by their share of the mass,
    # written straight into the (B, Q, H, D) layout the caller returns.
    lse = torch.logaddexp(lse_pre, lse_own)
    out = query.new_empty(rows, q_len, kv_heads, groups, dim)
    merged = out.permute(0, 2, 3, 1, 4)
    torch.mul(out_own, torch.exp(lse_own - lse).unsqueeze(-1).to(out_own.dtype), out=merged)
    merged.addcmul_(out_pre, torch.exp(lse_pre - lse).unsqueeze(-1).to(out_pre.dtype))
    return out.view(rows, q_len, heads, dim), None


def _own_mask(
    state: _Pass, attention_mask: torch.Tensor | None, length: int, groups: int, query
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The mask of the rows' own positions in the grouped layout, (B, 1|H, G*Q, S),
    additive; and which (row, query) pairs see at least one own key ((B, Q) boolean),
    ``None`` when all do. Computed once per forward pass: every layer gets the same mask."""
    if attention_mask is None:
        return None, None
    rows, _, q_len, _ = query.shape
    memo_key = (id(attention_mask), length, groups, q_len, query.dtype)
    hit = state.masks.get(memo_key)
    if hit is not None and hit[0] is attention_mask:
        return hit[1], hit[2]
    own = attention_mask[..., length:].expand(rows, -1, q_len, -1)  # (B, 1|H, Q, S)
    sees = own if own.dtype == torch.bool else own > torch.finfo(own.dtype).min / 2
    real = sees.any(-1).any(1)  # (B, Q): in any head
    real = None if bool(real.all()) else real
    mask = own.repeat(1, 1, groups, 1) if own.shape[1] == 1 else own
    mask = mask.reshape(rows, -1, groups * q_len, mask.shape[-1])
    if mask.dtype == torch.bool:
        # A very negative number, not -inf: a padding query that sees none of its
        # own keys then gets a finite (and negligible) share instead of NaN.
        floor = torch.finfo(query.dtype).min
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~mask, floor
        )
    else:
        mask = mask.to(query.dtype)
    state.masks[memo_key] = (attention_mask, mask, real)
    return mask, real


def register() -> str:
    """Make :data:`IMPLEMENTATION` known to transformers (attention and mask); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, shared_prefix_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return IMPLEMENTATION
