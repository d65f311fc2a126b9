"""Whether a variant of a model's forward pass gives the plain pass's logits.

The engine's packed weights (:mod:`emoprompt.inference.packed_linear`) change how a
forward pass computes, never what: they are checked once per model, on a short input,
before they are used.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch


def logits_agree(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    variant: Callable[[], AbstractContextManager],
    columns: torch.Tensor | None = None,
    tolerance: float = 1e-3,
) -> bool:
    """Whether ``model``'s last-position logits on ``input_ids`` (one row of a few
    tokens) are the same within the context ``variant()`` as without it, within
    ``tolerance`` relative to the logits' scale. With ``columns`` only those token ids
    are compared; the variant may then give those columns alone."""
    with torch.inference_mode():
        plain = model(input_ids=input_ids, use_cache=False).logits[:, -1]
        with variant():
            other = model(input_ids=input_ids, use_cache=False).logits[:, -1]
    if columns is not None:
        plain = plain[:, columns]
        if other.shape[-1] != len(columns):
            other = other[:, columns]
    scale = plain.abs().max().clamp(min=1.0)
    return other.shape == plain.shape and bool(((other - plain).abs().max() / scale) <= tolerance)
