"""Which of the engine's speed-ups a model can use, decided once when an engine is built.

Each speed-up changes how a forward pass computes, never what it computes:

* ``tree_labels`` - label likelihoods score all labels of a batch in one extra pass, the
  labels laid side by side with a 4D attention mask (a tree of continuations). Attention
  kernels that take no such mask, and sliding-window layers, get one pass per label.
* ``force_gqa`` - transformers' SDPA path copies keys and values once per query head
  group (``repeat_kv``) whenever a mask is given, because CUDA kernels cannot take a
  mask with grouped-query attention; PyTorch's CPU kernel can (``enable_gqa=True``). For
  short queries over a long cache (suffixes after a few-shot prefix, labels, decoding)
  that saves ~20-30% of a forward pass; for long self-attention (whole prompts) it is
  slightly slower, so the engine uses it only for the former.
* ``shared_attention`` - rows that continue one cached prefix share one copy of it and
  attend to it all at once (:mod:`emoprompt.inference.attention`).
* ``last_layer`` / ``head`` - passes that keep the last position's logits only run the
  last layer's output projection and MLP for that position, and first-token scores
  compute the label tokens' logits only (:mod:`emoprompt.inference.last_position`).
* ``packed`` - float32 linear layers on a CPU compute through oneDNN with weights packed
  once (:mod:`emoprompt.inference.packed_linear`); the LM head stays plain.

The last two are checked once per model against the plain forward pass before use.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from emoprompt.inference.agreement import logits_agree
from emoprompt.inference.attention import IMPLEMENTATION as SHARED_PREFIX_ATTENTION
from emoprompt.inference.attention import register as register_attention
from emoprompt.inference.last_position import last_layer, narrowing_agrees, output_head
from emoprompt.inference.packed_linear import PackedLinears
from emoprompt.inference.tokens import TokenizerRules

log = logging.getLogger(__name__)

# Per model, whether each of the engine's ways of computing agrees with the plain
# forward pass (agrees()): checked once, for every engine built on the model.
_AGREEMENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The short input on which each speed-up is checked against the plain forward pass.
AGREEMENT_TEXT = "Hola, ¿qué tal estás hoy?"


@dataclass
class Capabilities:
    """What one engine may do with its model (see the module docstring)."""

    cache_arg: str  # "cache" (transformers 5) or the older "past_key_values"
    keeps_logits: bool  # the forward takes logits_to_keep
    tree_labels: bool
    force_gqa: bool
    shared_attention: bool
    head: torch.nn.Linear | None
    last_layer: torch.nn.Module | None
    packed: PackedLinears | None


def _signature(model: Any) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def is_sliding(config: Any) -> bool:
    """Whether any layer of the model attends through a sliding or chunked window."""
    layer_types = getattr(config, "layer_types", None) or []
    return any("sliding" in str(t) or "chunked" in str(t) for t in layer_types) or (
        not layer_types and getattr(config, "sliding_window", None) is not None
    )


def agrees(
    model: Any, rules: TokenizerRules, name: str, check: Callable[[torch.Tensor], bool]
) -> bool:
    """``check(input_ids)`` on a short input, once per model and ``name``: whether a way
    of computing gives the plain forward pass's logits (it depends on the model's layers
    and kernels, not on its weights)."""
    results = _AGREEMENT.setdefault(model, {})
    if name not in results:
        ids = rules.encode_prompt(AGREEMENT_TEXT)
        device = next(model.parameters()).device
        results[name] = check(torch.tensor([ids], device=device))
    return results[name]


def detect(model: Any, rules: TokenizerRules, *, packed_weights: bool) -> Capabilities:
    """Decide the speed-ups for ``model``; registers the shared-prefix attention on it
    (SDPA underneath) where that is used."""
    device = next(model.parameters()).device
    params = _signature(model)
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn == SHARED_PREFIX_ATTENTION:  # set by an earlier engine: SDPA underneath
        attn = "sdpa"
    sliding = is_sliding(config)
    force_gqa = attn == "sdpa" and device.type == "cpu"
    shared = False
    if force_gqa and not sliding and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(register_attention())
        shared = True
    head = output_head(model)
    layer = last_layer(model)
    if layer is not None and not agrees(
        model, rules, "narrowing", lambda ids: narrowing_agrees(model, layer, head, ids)
    ):
        log.warning("last-position narrowing changes this model's logits; not used")
        layer = None
    return Capabilities(
        cache_arg="cache" if "cache" in params else "past_key_values",
        keeps_logits="logits_to_keep" in params,
        tree_labels=attn in ("sdpa", "eager") and not sliding,
        force_gqa=force_gqa,
        shared_attention=shared,
        head=head,
        last_layer=layer,
        packed=_packed_linears(model, rules, head) if packed_weights else None,
    )


def _packed_linears(model: Any, rules: TokenizerRules, head: Any) -> PackedLinears | None:
    if next(model.parameters()).device.type != "cpu":
        return None
    packed = PackedLinears.of(model, exclude=[head] if head else [])
    if packed is None:
        return None
    if not agrees(
        model, rules, "packed weights", lambda ids: logits_agree(model, ids, packed.active)
    ):
        log.warning("oneDNN-packed linear layers change this model's logits; not used")
        return None
    log.info(
        "%d linear layers run through oneDNN with packed weights (%.0f MiB)",
        len(packed.modules),
        packed.nbytes / 2**20,
    )
    return packed
