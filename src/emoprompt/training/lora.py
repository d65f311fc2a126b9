"""The LoRA adapter put on a base model (peft), optionally on its top layers only."""

from __future__ import annotations

from typing import Any

import torch

from emoprompt.training.settings import ALL_LINEAR, FinetuneSettings


def lora_model(model: Any, settings: FinetuneSettings, quantized: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing
        )
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    targets: str | list[str] = settings.target_modules
    layers = None
    if settings.lora_layers != "all":
        # Only the top layers learn: the backward pass stops below them, which roughly
        # halves a step's cost with the top third of the layers.
        count = int(model.config.num_hidden_layers)
        layers = list(range(max(0, count - int(settings.lora_layers)), count))
        if targets == ALL_LINEAR:  # peft takes layers_to_transform with names only
            targets = linear_module_names(model)
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def linear_module_names(model: Any) -> list[str]:
    """Names of the linear layers inside the decoder layers (what ``all-linear`` means)."""
    names = set()
    output = model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output and ".layers." in name:
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise ValueError("no linear layers found in the decoder layers; set target_modules")
    return sorted(names)
