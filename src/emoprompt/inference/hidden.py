"""Hidden states of a causal LM as features: one vector per text, per layer and pooling.

:func:`layer_features` reads the residual stream after chosen decoder layers (the
``hidden_states[layer]`` that transformers returns with ``output_hidden_states=True``;
after the last layer, the final norm applied, as there),
pooled over each text's tokens (``mean``) or taken at its last token (``last``). Texts go
in batches of similar length (right padding, the mask excludes the pads) and the forward
stops after the deepest layer asked for, so the layers above it cost nothing. Both are
checked against ``output_hidden_states`` of a plain one-text forward
(``tests/test_probe.py``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

POOLINGS = ("mean", "last")


class _Enough(Exception):
    """Raised by the hook on the deepest layer asked for: the rest is not needed."""


def decoder_of(model: Any) -> tuple[torch.nn.ModuleList, Any]:
    """The decoder's list of layers and its final norm (None if it has none), through a
    peft wrapper too."""
    from emoprompt.inference.capabilities import base_model

    decoder = base_model(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(decoder).__name__} has no list of decoder layers to read")
    return layers, getattr(decoder, "norm", None)


def check_layers(layers: Sequence[int], depth: int) -> list[int]:
    """Layers as given (1 = after the first decoder layer, ``depth`` = after the last);
    negative ones count from the top (-1 = the last)."""
    resolved = []
    for layer in layers:
        value = depth + 1 + layer if layer < 0 else layer
        if not 1 <= value <= depth:
            raise ValueError(f"layer {layer} is outside the model's 1..{depth} decoder layers")
        resolved.append(value)
    return resolved


def layer_features(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    max_length: int = 128,
    progress: str | None = None,
    autocast: bool = False,
) -> dict[tuple[int, str], np.ndarray]:
    """``{(layer, pooling): array (texts x hidden size)}`` for every layer and pooling.

    Texts are tokenised with the tokenizer's special tokens (BOS where it adds one) and
    cut to ``max_length`` tokens. Features are float32 whatever the model's dtype;
    ``autocast`` runs the matrix products in bfloat16.
    """
    from tqdm.auto import tqdm

    stack, final_norm = decoder_of(model)
    wanted = check_layers(layers, len(stack))
    device = next(model.parameters()).device
    encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {(layer, p): [None] * len(texts) for layer in wanted for p in POOLINGS}
    bar = tqdm(
        total=len(texts),
        desc=progress,
        unit="tweet",
        disable=progress is None,
        mininterval=5.0,
        file=sys.stderr,
    )
    with (
        bar,
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast),
    ):
        for rows in by_length([len(e) for e in encoded], batch_size):
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, : len(encoded[i])] = 1
            captured = states_after(model, wanted, ids.to(device), mask.to(device))
            keep = mask.to(device)[..., None].float()
            last = mask.sum(1) - 1
            for layer in wanted:
                states = captured[layer]
                if layer == len(stack) and final_norm is not None:
                    states = final_norm(states)  # as transformers' last hidden state
                states = states.float()
                mean = (states * keep).sum(1) / keep.sum(1)
                final = states[torch.arange(len(rows)), last.to(device)]
                for r, i in enumerate(rows):
                    out[(layer, "mean")][i] = mean[r].cpu().numpy()
                    out[(layer, "last")][i] = final[r].cpu().numpy()
            bar.update(len(rows))
    return {key: np.stack(rows).astype(np.float32) for key, rows in out.items()}


def by_length(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length: shortest first, ties in order (fixed, so
    the same texts always meet the same batch shapes)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def states_after(
    model: Any,
    layers: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> dict[int, torch.Tensor]:
    """The residual stream after each of ``layers`` (1 = after the first decoder layer),
    for one padded batch: the forward stops after the deepest of them."""
    stack, _ = decoder_of(model)
    deepest = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(_module, _args, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _Enough

        return hook

    handles = [stack[layer - 1].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        with contextlib.suppress(_Enough):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured
