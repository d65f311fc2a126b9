"""The frozen bottom of the model, computed once per tweet (a fine-tuning speed-up).

With the adapter on the top decoder layers only (``lora_layers``), the layers below it
learn nothing, and their output for a tweet is the same at every step of every epoch.
:func:`frozen_states` computes it once for every training tweet before the first step
(no gradients, in fixed batches of similar length, the same autocast as the steps), and
each step then runs only the layers above, from those states (:func:`top_layers`,
``inputs_embeds``): the bottom layers' forward is paid once instead of once per epoch,
and the steps never build its graph.

It is the same computation, only not repeated: tests/test_finetune.py checks that a
step's loss and gradients equal the plain step's (the whole model from the token ids)
on each architecture it is enabled for, in float32 and with bfloat16 autocast, and that
a killed and resumed run ends with the same adapter as an uninterrupted one. It is on
where that was shown (:func:`frozen_plan`) and nowhere else.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from emoprompt.inference.hidden import by_length, decoder_of, states_after
from emoprompt.training.dataset import Example, collate

#: Model types whose decoder takes the bottom layers' output as ``inputs_embeds`` unchanged
#: (no embedding scale or other step between the embeddings and the first layer).
ARCHITECTURES = ("llama",)


def frozen_depth(model: Any) -> int:
    """How many bottom decoder layers (and the embeddings below them) have no trainable
    parameter: 0 when the embeddings or the first layer learn."""
    from emoprompt.inference.capabilities import base_model

    base = base_model(model)
    if any(p.requires_grad for p in base.get_input_embeddings().parameters()):
        return 0
    stack, _ = decoder_of(model)
    for depth, layer in enumerate(stack):
        if any(p.requires_grad for p in layer.parameters()):
            return depth
    return len(stack)


def frozen_plan(model: Any, setting: str, device: str, quantization: str, checkpointing: bool):
    """``(depth, why)``: the bottom layers to compute once (0: the speed-up is off) and
    why it is off where it is."""
    from emoprompt.inference.capabilities import base_model

    if setting == "off":
        return 0, "turned off (frozen_states: off)"
    model_type = getattr(base_model(model).config, "model_type", None)
    reasons = [
        (model_type not in ARCHITECTURES, f"not proven for {model_type} models"),
        (device != "cpu", f"not proven on {device}"),
        (quantization != "none", f"not proven with {quantization} quantization"),
        (checkpointing, "not with gradient checkpointing"),
    ]
    for off, why in reasons:
        if off:
            return 0, why
    depth = frozen_depth(model)
    if depth == 0:
        return 0, "the adapter is on the bottom layer: nothing below it is frozen"
    return depth, None


def frozen_states(
    model: Any,
    examples: Sequence[Example],
    pad_id: int,
    depth: int,
    *,
    autocast: bool,
    batch_size: int = 16,
    desc: str | None = None,
) -> list[torch.Tensor]:
    """Each example's residual stream after the bottom ``depth`` layers (its own tokens
    only, on the model's device), in batches of similar length."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(examples)
    bar = tqdm(total=len(examples), desc=desc, unit="tweet", mininterval=5.0, file=sys.stderr)
    with (
        bar,
        torch.no_grad(),  # not inference_mode: the states are inputs of the steps' graphs
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast),
    ):
        for rows in by_length([len(e.input_ids) for e in examples], batch_size):
            batch = collate([examples[i] for i in rows], pad_id)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            states = states_after(model, [depth], ids, mask)[depth]
            for r, i in enumerate(rows):
                out[i] = states[r, : len(examples[i].input_ids)].clone()
            bar.update(len(rows))
    return out  # type: ignore[return-value]


def padded(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """The states of one batch, right-padded with zeros (the attention mask hides them,
    and every other operation is per position)."""
    width = max(len(s) for s in states)
    out = states[0].new_zeros((len(states), width, states[0].shape[-1]))
    for r, s in enumerate(states):
        out[r, : len(s)] = s
    return out


@contextlib.contextmanager
def top_layers(model: Any, depth: int) -> Iterator[None]:
    """The model with only its decoder layers above ``depth`` (their own modules, so the
    adapter and its gradients are the same), for a forward from ``inputs_embeds``."""
    from emoprompt.inference.capabilities import base_model

    decoder = base_model(model).get_decoder()
    whole = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(whole)[depth:])
    try:
        yield
    finally:
        decoder.layers = whole
