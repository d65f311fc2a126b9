"""Prompt files and their rendering, with Meta's real Llama 3 tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from emoprompt.evaluation.runner import to_seven
from emoprompt.inference.engine import Engine, LabelCollisionError
from emoprompt.labels import LABELS
from emoprompt.prompting.prompt_file import PromptError, load_prompt_file
from emoprompt.prompting.render import chat_messages, render_chat, render_plain

ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
FIXED_DATE = {"date_string": "26 Jul 2024"}


@pytest.fixture(scope="module")
def zero_shot():
    return load_prompt_file(REPO / "prompts" / "zero_shot.yaml", "zero_shot")


@pytest.fixture(scope="module")
def few_shot():
    return load_prompt_file(REPO / "prompts" / "few_shot.yaml", "few_shot")


@pytest.fixture(scope="module")
def finetuned():
    return load_prompt_file(REPO / "prompts" / "finetuned.yaml", "finetuned")


def test_zero_shot_chat_prompt_structure(zero_shot, llama3_tokenizer):
    messages = chat_messages(zero_shot, "Qué día tan bonito {no es un campo}")
    assert [m["role"] for m in messages] == ["system", "user"]
    parts = render_chat(llama3_tokenizer, messages, FIXED_DATE)
    assert parts.text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert "Cutting Knowledge Date" in parts.prefix and "26 Jul 2024" in parts.prefix
    assert messages[0]["content"] in parts.prefix
    assert "{labels}" not in parts.prefix and "Miedo, Sorpresa, Otras." in parts.prefix
    # The tweet's own part: its user turn, then the assistant header where the answer starts.
    assert parts.suffix == (
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "Qué día tan bonito {no es un campo}<|eot_id|>" + ASSISTANT_HEADER
    )


def test_few_shot_turns_come_before_the_question(few_shot, llama3_tokenizer):
    shots = [("me encanta", "Alegría"), ("qué asco", "Desagrado"), ("vaya", "Otras")]
    messages = chat_messages(few_shot, "la pregunta nueva", shots)
    roles = [m["role"] for m in messages]
    assert roles == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert [m["content"] for m in messages[2:7:2]] == ["Alegría", "Desagrado", "Otras"]
    parts = render_chat(llama3_tokenizer, messages, FIXED_DATE)
    # The shots belong to the shared prefix, in order, each answer closed by <|eot_id|>.
    positions = [parts.prefix.index(text) for text, _ in shots]
    assert positions == sorted(positions)
    assert parts.prefix.endswith(ASSISTANT_HEADER[:-2] + "\n\nOtras<|eot_id|>")
    assert "la pregunta nueva" in parts.suffix and "la pregunta nueva" not in parts.prefix


def test_label_first_tokens_after_the_assistant_header(zero_shot, tiny_llama):
    model, tokenizer = tiny_llama
    engine = Engine(model, tokenizer, progress=False)
    context = render_chat(tokenizer, chat_messages(zero_shot, "hola"), FIXED_DATE).text
    firsts = engine.label_first_tokens(LABELS, context)
    # After "\n\n" a label is written without a leading space: its own first token.
    expected = [tokenizer.encode(label, add_special_tokens=False)[0] for label in LABELS]
    assert firsts == expected
    assert len(set(firsts)) == len(LABELS)
    assert not any(t.startswith("Ġ") for t in tokenizer.convert_ids_to_tokens(firsts))


def test_labels_sharing_a_first_token_are_refused(zero_shot, tiny_llama):
    model, tokenizer = tiny_llama
    engine = Engine(model, tokenizer, progress=False)
    context = render_chat(tokenizer, chat_messages(zero_shot, "hola"), FIXED_DATE).text
    pair = ["Sorpresa", "Sorprendido"]
    first = [tokenizer.encode(x, add_special_tokens=False)[0] for x in pair]
    assert first[0] == first[1]  # both start with the same token under Llama 3
    with pytest.raises(LabelCollisionError, match=r"label.likelihood"):
        engine.label_first_tokens(pair, context)
    with pytest.raises(LabelCollisionError):
        engine.first_token_probs([render_chat(tokenizer, chat_messages(zero_shot, "x"))], pair)


def test_finetuned_plain_prompt_and_six_to_seven_mapping(finetuned):
    parts = render_plain(finetuned, "No puedo más")
    assert parts.text == "### Texto:\nNo puedo más\n\n### Emoción:\n"
    assert parts.prefix == "### Texto:\n"
    assert finetuned.labels == ("Alegría", "Tristeza", "Ira", "Miedo", "Sorpresa", "Neutral")
    assert finetuned.label_map["Neutral"] == "Otras"
    probs6 = np.array([[0.1, 0.2, 0.3, 0.1, 0.05, 0.25]])
    probs7 = to_seven(probs6, finetuned.labels, finetuned.label_map)
    assert probs7.shape == (1, 7)
    assert probs7[0, LABELS.index("Desagrado")] == 0
    assert probs7[0, LABELS.index("Otras")] == pytest.approx(0.25)
    assert probs7[0, LABELS.index("Ira")] == pytest.approx(0.3)
    assert probs7.sum() == pytest.approx(1)


@pytest.mark.parametrize(
    ("family", "text", "message"),
    [
        ("zero_shot", "system: hola\nuser: sin marcador\n", "placeholder {tweet}"),
        ("zero_shot", "system: hola\nuser: '{tweet}'\nshots: 3\n", "unknown key(s) shots"),
        ("zero_shot", "user: '{tweet}'\n", "missing key 'system'"),
        ("finetuned", "template: '{tweet}'\nlabels: [Alegría, Feliz]\n", "Feliz"),
        ("few_shot", "- a\n- b\n", "expected a mapping"),
    ],
)
def test_malformed_prompt_files_name_the_problem(tmp_path: Path, family, text, message):
    path = tmp_path / "prompt.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PromptError, match=r"prompt\.yaml") as info:
        load_prompt_file(path, family)
    assert message in str(info.value)


# --- placeholders ------------------------------------------------------------------------
def _prompt_file(tmp_path: Path, name: str, replace: tuple[str, str] | None = None,
                 extra: str = "") -> Path:  # fmt: skip
    text = (REPO / "prompts" / f"{name}.yaml").read_text(encoding="utf-8")
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text + extra, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "replace", "key", "placeholder"),
    [
        ("zero_shot", ('user: "{tweet}"', 'user: "{usuario}: {tweet}"'), "user", "usuario"),
        ("few_shot", ('assistant: "{label}"', 'assistant: "{label} ({tweet})"'),
         "assistant", "tweet"),
        ("finetuned", ("{tweet}", "{tweet} {emocion}"), "template", "emocion"),
    ],
)  # fmt: skip
def test_an_unknown_placeholder_is_refused_naming_file_key_and_placeholder(
    tmp_path, name, replace, key, placeholder
):
    path = _prompt_file(tmp_path, name, replace)
    with pytest.raises(PromptError) as caught:
        load_prompt_file(path, name)
    message = str(caught.value)
    assert f"{path}: {key!r} has the placeholder {{{placeholder}}}, which nothing fills" in message
    assert f"{{{{{placeholder}}}}}" in message  # how to write it as text


def test_declared_variables_escaped_braces_and_a_json_example_render_as_written(tmp_path):
    system = 'system: "Responde en JSON, por ejemplo {\\"emocion\\": \\"Alegría\\"}. {tarea}"'
    path = _prompt_file(
        tmp_path, "zero_shot", ('user: "{tweet}"', 'user: "{{usuario}}: {tweet}"'),
        extra=f"{system}\nvariables:\n  tarea: Clasifica la emoción.\n",
    )  # fmt: skip
    lines = path.read_text(encoding="utf-8").splitlines()  # the shipped system prompt out
    start = next(i for i, line in enumerate(lines) if line.startswith("system: |-"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("  "))
    path.write_text("\n".join(lines[:start] + lines[end:]) + "\n", encoding="utf-8")
    prompt = load_prompt_file(path, "zero_shot")
    messages = chat_messages(prompt, "un tuit con {tarea} y {{x}}")
    assert messages[0]["content"] == (
        'Responde en JSON, por ejemplo {"emocion": "Alegría"}. Clasifica la emoción.'
    )
    assert messages[1]["content"] == "{usuario}: un tuit con {tarea} y {{x}}"  # the tweet as is


def test_a_dry_run_stops_on_an_unknown_placeholder(workflow_dir):
    from conftest import run_snakemake

    prompt = workflow_dir / "prompts" / "zero_shot.yaml"
    prompt.write_text(prompt.read_text().replace('user: "{tweet}"', 'user: "{usuario}: {tweet}"'))
    result = run_snakemake(workflow_dir, "-n", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "prompts/zero_shot.yaml: 'user' has the placeholder {usuario}" in output
