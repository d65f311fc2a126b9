"""Meta's Llama 3 tokenizer, built offline, and Llama 3.2 1B's shape with random weights.

The tokenizer is Meta's tiktoken BPE file inside the ``llama-models`` package
(``llama_models/llama3/tokenizer.model``; building it needs ``tiktoken``) turned into a
fast tokenizer with the Llama 3.2 special tokens and the Instruct chat template. With a
randomly initialised model of :data:`LLAMA_3_2_1B`'s configuration it gives the tests
and the GPU check (:mod:`emoprompt.bench.gpu_check`) the reference model's tokenizer,
chat template and shapes, with nothing fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

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

#: Llama-3.2-1B(-Instruct)'s configuration: 16 layers, hidden 2048, 32 heads and 8
#: key-value heads, intermediate 8192, the Llama 3 vocabulary, tied embeddings.
LLAMA_3_2_1B: dict[str, Any] = {
    "vocab_size": LLAMA3_VOCAB_SIZE,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": True,
    "bos_token_id": LLAMA3_BASE_VOCAB,
    "eos_token_id": LLAMA3_STOP_IDS,
}
#: The same architecture, tiny (layers 64 wide: bitsandbytes' CPU code runs NF4 on them).
LLAMA_TINY: dict[str, Any] = {
    **LLAMA_3_2_1B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def random_llama(shape: dict[str, Any], seed: int = 0) -> Any:
    """A seeded, randomly initialised ``LlamaForCausalLM`` of ``shape`` (float32, CPU),
    with Llama 3.2 Instruct's stop tokens."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=LLAMA3_BASE_VOCAB, eos_token_id=LLAMA3_STOP_IDS
    )
    return model


def llama3_tokenizer_model_path() -> Path:
    """Meta's Llama 3 BPE file inside the installed ``llama-models`` package.

    Located with find_spec so that nothing of ``llama_models`` is imported.
    """
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "llama-models is not installed (pip install --no-deps llama-models)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llama-models package")
    return path


def build_llama3_tokenizer(out: Path | str) -> None:
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
