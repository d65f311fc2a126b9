"""A look inside a model, as the course notebook offered: tokenizer, size, architecture."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emoprompt.data.splits import read_split
from emoprompt.inference.tokens import TokenizerRules
from emoprompt.infra.files import atomic_open
from emoprompt.models.adapter import adapter_prompt
from emoprompt.models.spec import ModelSpec
from emoprompt.prompting.prompt_file import file_family, load_prompt_file
from emoprompt.prompting.render import render

GPT2_SPACE = "Ġ"  # how byte-level BPE shows the space byte inside a token
GPT2_NEWLINE = "Ċ"


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else "` `"


def token_table(tokenizer: Any, text: str) -> list[str]:
    """Markdown rows: position, token as stored in the vocabulary, id, decoded text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = ["| # | token | id | text |", "|---:|---|---:|---|"]
    for i, token_id in enumerate(ids):
        token = tokenizer.convert_ids_to_tokens(token_id)
        shown = tokenizer.decode([token_id]).replace("\n", "\\n")
        rows.append(f"| {i} | {_cell(token)} | {token_id} | {_cell(shown)} |")
    return rows


def parameter_summary(model: Any) -> dict[str, Any]:
    config = model.config
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "embedding width (hidden_size)": getattr(config, "hidden_size", None),
        "decoder layers": getattr(config, "num_hidden_layers", None),
        "attention heads": getattr(config, "num_attention_heads", None),
        "key/value heads": getattr(config, "num_key_value_heads", None),
        "MLP width (intermediate_size)": getattr(config, "intermediate_size", None),
        "vocabulary (config)": getattr(config, "vocab_size", None),
        "context length": getattr(config, "max_position_embeddings", None),
    }


def inspection_markdown(
    model_name: str,
    model: Any,
    tokenizer: Any,
    info: Mapping[str, Any],
    tweet: str,
    prompt_text: str,
    labels: list[str],
    label_tokens: list[list[int]],
) -> str:
    """The inspection page for one model, as Markdown."""
    prompt_length = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    lines = [f"# Inside {model_name}", ""]
    lines += [f"- {key}: {value}" for key, value in info.items() if value is not None]
    lines += ["", "## Tokenizer", "", f"Vocabulary size: **{len(tokenizer):,}** tokens "]
    lines += [
        f"(base vocabulary {tokenizer.vocab_size:,} plus "
        f"{len(tokenizer) - tokenizer.vocab_size:,} added and special tokens).",
        "",
        "A tweet from the evaluation sample:",
        "",
        f"> {tweet}",
        "",
        "is split into these tokens:",
        "",
        *token_table(tokenizer, tweet),
        "",
        f"`{GPT2_SPACE}` is how a byte-level BPE tokenizer (GPT-2, Llama 3, SmolLM2) writes the "
        "space byte inside a token: a token that starts with it is a word that follows a "
        f"space, so `{GPT2_SPACE}hola` and `hola` are different tokens with different ids. "
        f"`{GPT2_NEWLINE}` is the newline byte. Accented letters and emoji are several "
        "bytes and often several tokens, shown here in their byte-level form.",
        "",
        "## The prompt the model sees",
        "",
        f"The prompt for that tweet ({prompt_length} tokens):",
        "",
        "```text",
        prompt_text,
        "```",
        "",
        "## Label tokens",
        "",
        "Each label as the tokenizer writes it right after the prompt (where the answer "
        "begins). First-token scoring compares the first of these tokens; label "
        "likelihood scores them all.",
        "",
        "| label | tokens | ids |",
        "|---|---|---|",
    ]
    for label, ids in zip(labels, label_tokens, strict=True):
        tokens = " ".join(_cell(t) for t in tokenizer.convert_ids_to_tokens(ids))
        lines.append(f"| {label} | {tokens} | {', '.join(map(str, ids))} |")
    firsts = [ids[0] for ids in label_tokens]
    if len(set(firsts)) < len(firsts):
        lines += ["", "**Some labels share their first token**: use label likelihood."]
    lines += ["", "## Size", ""]
    for key, value in parameter_summary(model).items():
        if value is not None:
            lines.append(f"- {key}: {value:,}")
    lines += ["", "## Architecture", "", "```text", str(model), "```", ""]
    return "\n".join(lines)


def write_inspection(
    *,
    model_name: str,
    entry: Mapping[str, Any],
    sample_path: str,
    prompt_path: str,
    finetuned_prompt_path: str,
    out: str,
) -> None:
    """Load the model and write its inspection page to ``out``."""
    from emoprompt.models.loading import load_model

    spec = ModelSpec.of(entry)
    loaded = load_model(spec, spec.location)
    tweet = read_split(sample_path)["tweet"].iloc[0]
    if spec.prompt_format == "plain":
        prompt = load_prompt_file(finetuned_prompt_path, "finetuned")
    else:
        prompt = load_prompt_file(prompt_path, file_family("zero_shot", spec.prompt_format))
    if spec.adapter:  # a fine-tuned model's own label set (and template)
        prompt = adapter_prompt(prompt, spec.adapter)
    text = render(prompt, tweet, loaded.tokenizer, template_kwargs=spec.chat_template_kwargs).text
    labels = list(prompt.labels)
    label_tokens = TokenizerRules(loaded.tokenizer).label_tokens(list(prompt.answers()), text)
    page = inspection_markdown(
        model_name, loaded.model, loaded.tokenizer, loaded.info, tweet, text, labels, label_tokens
    )
    with atomic_open(out) as handle:
        handle.write(page)
