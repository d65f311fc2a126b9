"""Base models (catalogue prompt_format: text): plain-text prompt files, a GGUF split over
several packages assembled and checked, and a chat prompt refused for a model without a
chat template before the model loads. (Gemma 3 270M through the workflow:
tests/test_workflow_architectures.py.)"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO

from emoprompt.data.splits import write_split
from emoprompt.evaluation.job import run_prediction
from emoprompt.inference.tokens import TokenizerRules
from emoprompt.infra.errors import UserError
from emoprompt.labels import LABELS
from emoprompt.models.gguf import embedded_gguf
from emoprompt.models.loading import ModelLoadError
from emoprompt.prompting.prompt_file import PromptError, file_family, load_prompt_file
from emoprompt.prompting.render import prompt_record, render

ZERO = REPO / "prompts" / "zero_shot_text.yaml"
FEW = REPO / "prompts" / "few_shot_text.yaml"
SHOTS = [("¡Qué bien, por fin vacaciones!", "Alegría"), ("Se nos fue un grande", "Tristeza")]


def test_a_base_model_reads_the_plain_text_file_of_each_family():
    assert file_family("zero_shot", "text") == "zero_shot_text"
    assert file_family("few_shot", "text") == "few_shot_text"
    assert file_family("zero_shot", "chat") == "zero_shot"
    assert file_family("finetuned", "plain") == "finetuned"
    zero = load_prompt_file(ZERO, "zero_shot_text")
    assert (zero.family, zero.format) == ("zero_shot", "text")
    assert zero.answers() == tuple(f" {label}" for label in LABELS)
    chat = load_prompt_file(REPO / "prompts" / "zero_shot.yaml", "zero_shot")
    assert chat.answers() == LABELS  # a chat answer is the label itself


def test_shots_are_solved_blocks_and_the_tweets_block_is_left_open():
    few = load_prompt_file(FEW, "few_shot_text")
    parts = render(few, "Hoy llueve otra vez", shots=SHOTS)
    instruction = few.settings["instruction"].replace("{labels}", ", ".join(LABELS))
    assert parts.text == (
        f"{instruction}\n\n"
        "Tuit: ¡Qué bien, por fin vacaciones!\nEmoción: Alegría\n\n"
        "Tuit: Se nos fue un grande\nEmoción: Tristeza\n\n"
        "Tuit: Hoy llueve otra vez\nEmoción:"
    )
    # the shared prefix stops before the space the tweet's first token carries
    assert parts.prefix.endswith("\n\nTuit:") and parts.suffix.startswith(" Hoy")
    assert prompt_record(few, SHOTS)["text"].endswith("Tuit: {tweet}\nEmoción:")


@pytest.mark.parametrize("which", ["llama3_tokenizer", "smollm2"])
def test_the_prefix_splits_at_a_token_boundary_and_labels_follow_the_prompt(which, request):
    """So that prefix reuse applies (no fallback) and each answer is scored as written."""
    value = request.getfixturevalue(which)
    tokenizer = value[1] if isinstance(value, tuple) else value
    rules = TokenizerRules(tokenizer)
    zero = load_prompt_file(ZERO, "zero_shot_text")
    parts = render(zero, "Tengo miedo de mañana")
    whole = rules.encode([parts.text])[0]
    assert rules.encode([parts.prefix])[0] + rules.encode([parts.suffix])[0] == whole
    firsts = rules.label_first_tokens(list(zero.answers()), parts.text)
    assert len(set(firsts)) == len(LABELS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('answer: " {label}"', 'answer: " etiqueta"'), "'answer' must contain the placeholder"),
        (('template: "Tuit: {tweet}', 'template: "Tuit: {tuit}'), "{tuit}, which nothing fills"),
        (("answer:", "respuesta:"), "unknown key(s) respuesta"),
    ],
)
def test_a_malformed_plain_text_file_is_refused_naming_the_key(tmp_path, change, message):
    path = tmp_path / "zero_shot_text.yaml"
    path.write_text(ZERO.read_text(encoding="utf-8").replace(*change), encoding="utf-8")
    with pytest.raises(PromptError) as caught:
        load_prompt_file(path, "zero_shot_text")
    assert str(path) in str(caught.value) and message in str(caught.value)


# ------------------------------------------------------------ a GGUF split over packages
def _packages(root: Path, pieces: list[bytes]) -> list[dict[str, str]]:
    """Installed-looking packages ``part1``.. in ``root``, each holding one piece."""
    parts = []
    for i, piece in enumerate(pieces, 1):
        folder = root / f"emoprompt_test_part{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"m.gguf.part{i:02d}").write_bytes(piece)
        parts.append({"package": f"emoprompt_test_part{i}", "file": f"data/m.gguf.part{i:02d}"})
    return parts


@pytest.fixture
def split_gguf(tmp_path, monkeypatch):
    pieces = [b"GGUF" + bytes(range(200)), bytes(range(255, 0, -1)) * 3, b"end"]
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = _packages(tmp_path / "site", pieces)
    sys.modules.pop("emoprompt_test_part1", None)
    whole = b"".join(pieces)
    return {"package": None, "file": "m.gguf", "parts": parts, "dtype": "float32",
            "sha256": hashlib.sha256(whole).hexdigest()}, whole  # fmt: skip


def test_the_parts_are_put_together_in_order_and_checked(tmp_path, split_gguf):
    source, whole = split_gguf
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    path = embedded_gguf(source, scratch)
    assert path == scratch / "m.gguf" and path.read_bytes() == whole


def test_a_part_that_differs_from_the_pinned_digest_is_refused(tmp_path, split_gguf):
    source, _ = split_gguf
    (tmp_path / "site" / "emoprompt_test_part2" / "data" / "m.gguf.part02").write_bytes(b"x")
    with pytest.raises(ModelLoadError) as caught:
        embedded_gguf(source, tmp_path)
    message = str(caught.value)
    assert (
        "m.gguf (from emoprompt_test_part1, emoprompt_test_part2, emoprompt_test_part3)" in message
    )
    assert f"pins {source['sha256']}" in message


def test_a_missing_part_names_its_package_and_the_setup(tmp_path, split_gguf):
    source, _ = split_gguf
    source = {**source, "parts": [*source["parts"], {"package": "emoprompt_no_part", "file": "x"}]}
    with pytest.raises(
        ModelLoadError, match=r"'emoprompt_no_part' is not installed.*make gemma-setup"
    ):
        embedded_gguf(source, tmp_path)
    assert not (tmp_path / "m.gguf").exists()  # nothing assembled before every part is found


# ------------------------------------------- a chat prompt on a model without a template
def test_a_chat_prompt_for_a_model_without_a_chat_template_is_refused_before_it_loads(
    tmp_path, tiny_llama_dir, monkeypatch
):
    folder = tmp_path / "base-model"
    shutil.copytree(tiny_llama_dir, folder)  # the tiny Llama with its template removed
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("emoprompt.models.loading.load_model", no_load)
    sample = tmp_path / "sample.tsv"
    frame = pd.DataFrame({"id": ["a", "b"], "event": "X", "tweet": ["hola", "adiós"],
                          "offensive": "NO", "label": ["Alegría", "Tristeza"]})  # fmt: skip
    write_split(frame, sample)
    prompt = REPO / "prompts" / "zero_shot.yaml"
    with pytest.raises(UserError) as caught:
        run_prediction(
            model_name="my-base-model",
            entry={"source": "local", "prompt_format": "chat", "location": str(folder)},
            strategy_name="zero_shot_first_token",
            prompt_path=str(prompt),
            train_path=str(sample),
            sample_path=str(sample),
            settings={"engine": {}},
            job_threads=1,
            tsv_out=str(tmp_path / "out.tsv"),
            json_out=str(tmp_path / "out.json"),
        )
    message = str(caught.value)
    assert "my-base-model has prompt_format: chat" in message and "no chat template" in message
    assert str(prompt) in message and "prompt_format: text" in message
    assert not (tmp_path / "out.tsv").exists()
