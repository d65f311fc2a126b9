"""Getting a causal language model and its tokenizer loaded, and nothing else.

:func:`load_model` loads a folder or a hub id as one model catalogue entry
(:class:`emoprompt.models.spec.ModelSpec`) describes it (dtype, optional 4-bit NF4,
a fine-tuned adapter on top) and reports what it really got. The embedded GGUF model
is converted to such a folder first (:mod:`emoprompt.models.gguf`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emoprompt.infra.errors import UserError
from emoprompt.infra.files import sha256_file
from emoprompt.models.adapter import is_adapter, read_training_config
from emoprompt.models.files import check_model_folder, entry_prefix
from emoprompt.models.spec import ModelSpec

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
QUANTIZATIONS = ("none", "nf4")
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class ModelLoadError(UserError, RuntimeError):
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


def torch_dtype(name: str) -> torch.dtype | str:
    try:
        return DTYPES[name]
    except KeyError:
        expected = ", ".join(DTYPES)
        raise ModelLoadError(f"unknown dtype {name!r}; expected one of {expected}") from None


#: CPU flags of native bfloat16 matrix units: Intel AMX. AVX-512 BF16 alone (AMD Zen 4)
#: is not enough: there `make bench` measured bfloat16 scoring 1.8x faster than float32
#: but generation 0.88x, where AMX made both faster.
BF16_CPU_FLAGS = ("amx_bf16",)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux), or an empty set where they cannot be read."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def auto_dtype(device: str, flags: set[str] | None = None) -> tuple[str, str]:
    """What ``dtype: auto`` loads on ``device``, and why: bfloat16 on a CUDA device that
    supports it (else float16), on a CPU with native bfloat16 matrix units
    (:data:`BF16_CPU_FLAGS`); float32 elsewhere."""
    if device.startswith("cuda"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16", "CUDA device with bfloat16 support"
        return "float16", "CUDA device without bfloat16 support"
    if device == "cpu":
        found = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
        if found:
            return "bfloat16", f"CPU with native bfloat16 matrix units ({', '.join(found)})"
        return "float32", "CPU without native bfloat16 matrix units"
    return "float32", f"{device}: float32"


# CPUs whose bfloat16 matrix products pay in batched forward and backward passes
# (training, the probe's features): a training step measured 1.7x faster with AVX-512
# BF16 alone, where generation did not gain (hence AMX only for dtype: auto).
AUTOCAST_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def bf16_autocast(
    setting: str, device: str, quantization: str = "none", flags: set[str] | None = None
) -> bool:
    """Whether batched passes run under bfloat16 autocast (the weights stay as loaded).

    ``auto``: on CUDA (unquantized: 4-bit QLoRA computes in bfloat16 already) and on
    CPUs with bfloat16 matrix instructions (:data:`AUTOCAST_CPU_FLAGS`); ``bfloat16``
    forces it, ``none`` never."""
    if setting not in ("auto", "bfloat16", "none"):
        raise ValueError(f"autocast must be auto, bfloat16 or none, not {setting!r}")
    if setting != "auto":
        return setting == "bfloat16"
    if device == "cuda":
        return quantization == "none"
    if device == "cpu":
        return bool(set(AUTOCAST_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
    return False


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


#: bitsandbytes' NF4 runs on a CPU from this release (its own CPU code).
NF4_CPU_SINCE = "0.49"
#: Its CPU code quantises in blocks of 64 inputs: a narrower linear layer fails there.
NF4_BLOCK = 64


def bitsandbytes_installed() -> bool:
    from transformers.utils import is_bitsandbytes_available

    return is_bitsandbytes_available()


def nf4_blocker(device: str, path_or_id: str | None = None) -> str | None:
    """Why bitsandbytes NF4 cannot run here, or None when it can: on CUDA, or on a CPU
    with bitsandbytes 0.49 or newer and (given ``path_or_id``) layers it can quantise."""
    if not bitsandbytes_installed():
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    if device.startswith("cuda"):
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device != "cpu":
        return f"NF4 runs on CUDA or a CPU, not {device!r}"
    from importlib.metadata import version

    from packaging.version import Version

    installed = version("bitsandbytes")
    if Version(installed) < Version(NF4_CPU_SINCE):
        return f"bitsandbytes {installed} runs NF4 on CUDA only ({NF4_CPU_SINCE} or newer on a CPU)"
    return _narrow_layers(path_or_id) if path_or_id else None


def _narrow_layers(path_or_id: str) -> str | None:
    """Why bitsandbytes' CPU code cannot quantise this model's linear layers, or None."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except (OSError, ValueError):
        return None  # the load itself will say what is wrong
    config = getattr(config, "text_config", config)
    heads = getattr(config, "num_attention_heads", 0) or 0
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // max(heads, 1))
    widths = {
        "hidden_size": config.hidden_size,
        "intermediate_size": getattr(config, "intermediate_size", NF4_BLOCK),
        "attention width": heads * head_dim or NF4_BLOCK,
    }
    narrow = [f"{k} {v}" for k, v in widths.items() if v % NF4_BLOCK]
    if narrow:
        return (
            f"bitsandbytes' CPU code quantises layers in blocks of {NF4_BLOCK} inputs "
            f"and this model has {', '.join(narrow)}"
        )
    return None


def _weights_kwargs(spec: ModelSpec, path_or_id: str, device: str) -> tuple[dict, str | None]:
    """``from_pretrained`` keyword arguments for the dtype and quantisation, and the reason
    for a fallback to full precision (None when none was needed)."""
    from transformers import BitsAndBytesConfig

    if spec.quantization not in QUANTIZATIONS:
        raise ModelLoadError(
            f"unknown quantization {spec.quantization!r}; "
            f"expected one of {', '.join(QUANTIZATIONS)}"
        )
    dtype = torch_dtype(spec.dtype)
    if dtype == "auto":
        name, why = auto_dtype(device)
        log.info("%s: dtype auto is %s (%s)", path_or_id, name, why)
        dtype = torch_dtype(name)
    if spec.quantization != "nf4":
        return {"dtype": dtype, "device_map": device}, None
    blocker = nf4_blocker(device, path_or_id)
    if blocker is None:  # as the course notebook loads its model: bfloat16 compute
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        device_map = "auto" if device.startswith("cuda") else device
        return {"quantization_config": config, "dtype": dtype, "device_map": device_map}, None
    if not spec.allow_fallback:
        raise ModelLoadError(
            f"{path_or_id}: 4-bit NF4 was asked for but {blocker}; "
            "set allow_fallback: true to load it unquantized instead"
        )
    fallback = f"NF4 unavailable ({blocker}); loaded unquantized"
    log.warning("%s: %s", path_or_id, fallback)
    # Unquantized on a CPU means float32 (half precisions are slow or unsupported
    # there); on an accelerator bfloat16 keeps the memory down.
    full = torch.float32 if device == "cpu" else torch.bfloat16
    return {"dtype": full, "device_map": device}, fallback


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    common: dict[str, Any] = {"trust_remote_code": False}
    if spec.revision:
        common["revision"] = spec.revision
    token = _hub_token()
    if token:
        common["token"] = token
    return common


def _loading(path_or_id: str, load, name: str | None = None):
    """``load()``, its failures as :class:`ModelLoadError` naming the catalogue entry and
    the first line of the library's message; a hub token is scrubbed from it. A local
    folder's files are checked first (:func:`emoprompt.models.files.check_model_folder`)."""
    if Path(path_or_id).is_dir():
        check_model_folder(path_or_id, name)
    token = _hub_token()
    try:
        return load()
    except (OSError, ValueError, ImportError) as exc:
        # Messages from transformers name the repository and file, not the token;
        # scrub it anyway in case a URL or header echo ever carries it.
        # The original exception is not chained for the same reason.
        message = str(exc).replace(token, "***") if token else str(exc)
        first = message.strip().splitlines()[0] if message.strip() else ""
        raise ModelLoadError(
            f"{entry_prefix(name)}could not load {path_or_id}: {type(exc).__name__}: {first}"
        ) from None


def load_tokenizer(spec: ModelSpec | Mapping[str, Any], path_or_id: str) -> Any:
    """The tokenizer alone (cheap: no weights), set up as :func:`load_model` sets it."""
    from transformers import AutoTokenizer

    spec = ModelSpec.of(spec)
    common = _hub_kwargs(spec)
    return prepare_tokenizer(
        _loading(path_or_id, lambda: AutoTokenizer.from_pretrained(path_or_id, **common), spec.name)
    )


def context_length(spec: ModelSpec | Mapping[str, Any], path_or_id: str, tokenizer: Any) -> int:
    """The most tokens the model attends to: its configuration's position limit, or the
    tokenizer's ``model_max_length`` where that is smaller and set."""
    from transformers import AutoConfig

    spec = ModelSpec.of(spec)
    common = _hub_kwargs(spec)
    config = _loading(
        path_or_id, lambda: AutoConfig.from_pretrained(path_or_id, **common), spec.name
    )
    limits = [getattr(config, "max_position_embeddings", None)]
    limits.append(getattr(tokenizer, "model_max_length", None))
    usable = [int(n) for n in limits if isinstance(n, int) and 0 < n < 10**8]
    if not usable:
        raise ModelLoadError(f"{path_or_id}: neither the model nor its tokenizer states a context")
    return min(usable)


def generation_eos(path_or_id: str) -> int | list[int] | None:
    """The ``eos_token_id`` of the model's generation config (what ends its answers
    besides the tokenizer's EOS and end of turn), or None where it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path_or_id).eos_token_id
    except OSError:
        return None


def _from_pretrained(path_or_id: str, spec: ModelSpec, weights: dict[str, Any]):
    """Tokenizer and model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = _hub_kwargs(spec)
    tokenizer = _loading(
        path_or_id, lambda: AutoTokenizer.from_pretrained(path_or_id, **common), spec.name
    )
    model = _loading(
        path_or_id,
        lambda: AutoModelForCausalLM.from_pretrained(path_or_id, **common, **weights),
        spec.name,
    )
    return tokenizer, model


def load_model(
    spec: ModelSpec | Mapping[str, Any], path_or_id: str, device: str | None = None
) -> LoadedModel:
    """Load a causal LM and its tokenizer as one model catalogue entry describes.

    ``spec`` (a :class:`ModelSpec` or a catalogue entry): ``dtype``
    (float32|bfloat16|float16|auto), ``quantization`` (none|nf4), ``allow_fallback``
    (load unquantized when NF4 cannot run), ``revision`` and optionally ``name``; code
    from a model repository never runs. A hub token is read from ``HF_TOKEN`` or
    ``HUGGING_FACE_HUB_TOKEN``; it is passed to the hub and kept out of the result and
    the logs. An entry with ``source: finetuned`` also names ``adapter`` (a peft
    folder): ``path_or_id`` is then its base model, and the adapter is applied on top.
    """
    spec = ModelSpec.of(spec)
    device = device or default_device()
    weights, fallback = _weights_kwargs(spec, path_or_id, device)
    started = time.perf_counter()
    tokenizer, model = _from_pretrained(path_or_id, spec, weights)
    quantized = spec.quantization == "nf4" and fallback is None
    adapter = None
    if spec.is_finetuned:  # the base plus a peft LoRA adapter
        model, adapter = _apply_adapter(model, spec, merge=not quantized)
    model.eval()
    prepare_tokenizer(tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    info = {
        "name": spec.name or path_or_id,
        "source": path_or_id,
        "local": Path(path_or_id).is_dir(),
        "revision": spec.revision,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "dtype_requested": spec.dtype,
        "quantization": "nf4" if quantized else "none",
        "quantization_requested": spec.quantization,
        "fallback_used": fallback,
        "parameters": int(model.num_parameters()),
        "load_seconds": round(time.perf_counter() - started, 2),
    }
    if adapter is not None:
        info["adapter"] = adapter
    info["weights_sha256"] = weights_digest(path_or_id)
    # The hub commit the weights came from (a branch such as "main" moves).
    info["revision_resolved"] = getattr(model.config, "_commit_hash", None)
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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def weights_digest(path_or_id: str) -> str | None:
    """One sha256 over a local model folder's weight files (each file's name and sha256,
    sorted by name); None for a hub id (its resolved commit pins the files)."""
    folder = Path(path_or_id)
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    lines = "".join(f"{p.name}:{sha256_file(p)}\n" for p in files)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _apply_adapter(model: Any, spec: ModelSpec, merge: bool) -> tuple[Any, dict[str, Any]]:
    """Put the peft adapter of a ``source: finetuned`` entry on its loaded base model.

    ``spec.adapter`` is the adapter folder (written by the finetune rule). The adapter
    is merged into the weights (plain inference speed) unless the base is 4-bit.
    """
    from peft import PeftModel

    folder = spec.adapter
    if not is_adapter(folder):
        raise ModelLoadError(f"fine-tuned model: no peft adapter in {folder!r}")
    try:
        model = PeftModel.from_pretrained(model, folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load the adapter {folder}: {exc}") from None
    if merge:
        model = model.merge_and_unload()
    info: dict[str, Any] = {"path": str(folder), "merged": merge, "base": spec.base}
    with contextlib.suppress(FileNotFoundError):
        info["fingerprint"] = read_training_config(folder).get("fingerprint")
    return model, info
