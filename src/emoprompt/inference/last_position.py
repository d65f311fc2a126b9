"""Computing only what the next-token scores of a prompt need.

Scoring a batch of prompts needs the logits of their last position only, and a
first-token score needs only the label tokens' columns of those. A plain forward pass
still runs the last decoder layer's output projection and MLP for every position and
the LM head over the whole vocabulary. Two narrowings cut that work without touching
the result:

* :func:`last_position_only` - in the last decoder layer, the attention's output
  projection and the MLP see the last position only (the keys and values of every
  position are still computed, so the cache stays complete). The residual additions
  broadcast that one position over the sequence: the last position is exact, the
  others hold values nothing reads (the forward keeps the last position's logits).
  It applies to pre-norm decoder layers laid out as Llama's (``self_attn.o_proj``,
  ``post_attention_layernorm``, ``mlp``); :func:`last_layer` finds such a layer.
* :func:`head_columns` - the LM head computes the logits of the given token ids only.

Both are context managers around a model's forward pass. The engine checks once per
model, on a short input, that the narrowed pass gives the plain pass's logits before it
uses them (:func:`narrowing_agrees`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from emoprompt.inference.agreement import logits_agree
from emoprompt.inference.attention import last_query_only

# Decoder layers of these layouts have a norm of their own around the MLP's input or
# output that the narrowing does not account for: never narrowed.
_UNSUPPORTED_PARTS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def last_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's last decoder layer if it has Llama's layout, else ``None``."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        return None
    layer = layers[-1]
    attention = getattr(layer, "self_attn", None)
    if (
        attention is None
        or not isinstance(getattr(attention, "o_proj", None), torch.nn.Module)
        or not isinstance(getattr(layer, "post_attention_layernorm", None), torch.nn.Module)
        or not isinstance(getattr(layer, "mlp", None), torch.nn.Module)
        or any(hasattr(layer, name) for name in _UNSUPPORTED_PARTS)
    ):
        return None
    return layer


def _last_of_input(module, args):
    return (args[0][:, -1:], *args[1:])


def _last_of_output(module, args, output):
    return output[:, -1:]


@contextlib.contextmanager
def last_position_only(layer: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``layer`` (from :func:`last_layer`) projects the attention's
    output and runs its MLP for the last position only; under the engine's attention
    function its attention, too, computes the last query alone."""
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(_last_of_input),
        layer.post_attention_layernorm.register_forward_hook(_last_of_output),
    ]
    try:
        with last_query_only(layer.self_attn):
            yield
    finally:
        for handle in handles:
            handle.remove()


def output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head when it is a plain linear layer (else ``None``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if type(head) is torch.nn.Linear else None


@contextlib.contextmanager
def head_columns(head: torch.nn.Linear, ids: torch.Tensor) -> Iterator[None]:
    """Within the block, ``head`` computes the logits of token ``ids`` only, in that
    order: its output's last dimension is ``len(ids)``."""
    weight = head.weight[ids]
    bias = None if head.bias is None else head.bias[ids]
    previous = vars(head).get("forward")  # a wrapper of the instance's own, if any
    head.forward = lambda hidden: F.linear(hidden, weight, bias)
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def narrowing_agrees(
    model: torch.nn.Module,
    layer: torch.nn.Module,
    head: torch.nn.Linear | None,
    input_ids: torch.Tensor,
    tolerance: float = 1e-3,
) -> bool:
    """Whether the narrowed pass gives the plain pass's last-position logits on
    ``input_ids`` (one row of a few tokens), within ``tolerance`` (relative to the
    logits' scale)."""
    columns = torch.arange(8, device=input_ids.device)

    def narrowed() -> contextlib.ExitStack:
        with contextlib.ExitStack() as stack:  # undone if entering the second one fails
            stack.enter_context(last_position_only(layer))
            if head is not None:
                stack.enter_context(head_columns(head, columns))
            return stack.pop_all()

    return logits_agree(model, input_ids, narrowed, columns, tolerance)
