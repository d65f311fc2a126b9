"""Prompt families: variants expanded and sampled, applied to a prompt, calibrated, one
chosen on validation alone; and the family job (one model load for every variant)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO

from emoprompt.data.splits import write_split
from emoprompt.evaluation import family as family_module
from emoprompt.evaluation.calibration import batch_prior, calibrate, divide_by_prior
from emoprompt.evaluation.family import FamilySettings, run_family, tweets_frame
from emoprompt.evaluation.job import run_prediction
from emoprompt.evaluation.predictions import read_predictions
from emoprompt.evaluation.selection import choose_variant, write_chosen
from emoprompt.labels import LABELS
from emoprompt.plan import Study, merged_config
from emoprompt.prompting.prompt_file import PromptError
from emoprompt.prompting.render import chat_messages, render_text
from emoprompt.prompting.variants import BASE, apply, expand, load_family

ZERO = REPO / "prompts" / "zero_shot.yaml"
FEW = REPO / "prompts" / "few_shot.yaml"
ENGLISH = ["Joy", "Sadness", "Disgust", "Anger", "Fear", "Surprise", "Other"]


# --- expansion and sampling ------------------------------------------------------------
def test_a_family_is_the_product_of_its_axes_with_the_files_prompt_first():
    prompt = load_family(ZERO, "zero_shot")
    variants = expand(prompt, ["none", "batch"], axes=["instruction", "verbalizer"])
    assert len(variants) == 4 * 2 * 2
    assert variants[0].label == BASE and variants[0].index == 0
    assert [v.id for v in variants[:3]] == ["v000", "v001", "v002"]
    assert variants[1].params == {"instruction": BASE, "verbalizer": BASE, "format": BASE,
                                  "calibration": "batch"}  # fmt: skip
    assert len({v.prompt_key for v in variants}) == 8  # calibration shares the prompt
    # the axes not listed keep the file's value; the product is the same every time
    assert all(v.params["format"] == BASE for v in variants)
    assert expand(prompt, ["none", "batch"], axes=["instruction", "verbalizer"]) == variants
    assert len(expand(prompt, ["none"])) == 4 * 2 * 3  # all axes: the formats too


def test_a_sampled_family_is_seeded_stable_and_keeps_the_files_prompt():
    prompt = load_family(FEW, "few_shot")
    full = expand(prompt, ["none", "contextual", "batch"])
    assert len(full) == 4 * 2 * 3 * 3 * 3 * 3
    sample = expand(prompt, ["none", "contextual", "batch"], max_variants=10, seed=3)
    assert len(sample) == 10 and sample[0] == full[0]
    assert sample == expand(prompt, ["none", "contextual", "batch"], max_variants=10, seed=3)
    assert sample != expand(prompt, ["none", "contextual", "batch"], max_variants=10, seed=4)
    assert [v.index for v in sample] == sorted(v.index for v in sample)
    assert set(sample) <= set(full)


def test_a_variant_rewrites_instruction_words_and_shots():
    prompt = load_family(FEW, "few_shot")
    variant = next(
        v for v in expand(prompt, ["none"], axes=["instruction", "verbalizer", "shot_order"])
        if v.params["instruction"] == "breve" and v.params["verbalizer"] == "en"
        and v.params["shot_order"] == "orden1"
    )
    written = apply(prompt, variant)
    assert written.labels == tuple(ENGLISH)
    assert written.label_map["Other"] == "Otras" and written.word("Ira") == "Anger"
    assert written.settings["shot_order"] == 1
    messages = chat_messages(written, "hola", [("un tuit", "Ira")])
    assert messages[0]["content"].startswith("Clasifica la emoción del tweet. Categorías: Joy, ")
    assert messages[2] == {"role": "assistant", "content": "Anger"}  # the shot's word
    # the file's own prompt lists the Spanish names
    base = apply(prompt, expand(prompt)[0])
    system = chat_messages(base, "hola")[0]["content"]
    assert "{labels}" in base.settings["system"]
    assert "categorías: Alegría, Tristeza, Desagrado, Ira, Miedo, Sorpresa, Otras." in system


def test_a_plain_text_variant_answers_with_its_words():
    prompt = load_family(REPO / "prompts" / "zero_shot_text.yaml", "zero_shot_text")
    variant = next(v for v in expand(prompt) if v.label == "verbalizer=en, format=etiquetado")
    written = apply(prompt, variant)
    assert written.answers() == tuple(f" {w}" for w in ENGLISH)
    text = render_text(written, "hola", [("un tuit", "Miedo")]).text
    assert "Texto: un tuit\nEtiqueta: Fear\n\nTexto: hola\nEtiqueta:" in text


def tweets(n: int, start: int = 0) -> pd.DataFrame:
    """``n`` prepared tweets, the seven classes in turn."""
    ids = range(start, start + n)
    return pd.DataFrame({"id": [f"t{i}" for i in ids], "event": "X",
                         "tweet": [f"tuit número {i} sobre algo" for i in ids], "offensive": "NO",
                         "label": [LABELS[i % 7] for i in ids]})  # fmt: skip


def test_the_shot_order_shuffles_the_same_shots():
    from emoprompt.evaluation.prompts import build_prompts
    from emoprompt.evaluation.strategies import STRATEGIES

    train, sample = tweets(150), tweets(2, start=1000)
    prompt = load_family(FEW, "few_shot")
    strategy = STRATEGIES["few_shot_first_token"]
    _, plain = build_prompts(strategy, apply(prompt, expand(prompt)[0]), None, train, sample)
    ordered = next(v for v in expand(prompt, axes=["shot_order"]) if v.label == "shot_order=orden1")
    _, shuffled = build_prompts(strategy, apply(prompt, ordered), None, train, sample)
    shots = [m["content"] for m in plain["messages"][1:-1:2]]
    moved = [m["content"] for m in shuffled["messages"][1:-1:2]]
    assert sorted(shots) == sorted(moved) and shots != moved
    assert shuffled["few_shot"]["shot_order"] == 1


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ({"tone": {"x": "y"}}, "unknown axis 'tone'"),
        ({"verbalizer": {"en": {"Alegría": "Joy"}}}, "'variants.verbalizer.en' must name each"),
        ({"verbalizer": {"dup": dict.fromkeys(LABELS, "x")}}, "two classes share a word"),
        ({"instruction": {"base": "x"}}, "'base' is the file's own"),
        ({"instruction": {"x": "Clasifica {tono}"}}, "placeholder {tono}, which nothing fills"),
        ({"format": {"f": {"user": "sin tuit"}}}, "'user' must contain the placeholder {tweet}"),
        ({"seed": {"s": 1}}, "unknown axis 'seed'"),  # a zero-shot file has no shots
    ],
)
def test_a_malformed_family_is_refused_naming_the_file_and_axis(tmp_path, variants, message):
    data = yaml.safe_load(ZERO.read_text(encoding="utf-8"))
    data["variants"] = variants
    path = tmp_path / "zero_shot.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(PromptError) as caught:
        load_family(path, "zero_shot")
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_a_few_shot_answer_format_must_start_with_the_label(tmp_path):
    data = yaml.safe_load(FEW.read_text(encoding="utf-8"))
    data["variants"] = {"format": {"f": {"assistant": "Emoción: {label}"}}}
    path = tmp_path / "few_shot.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(PromptError, match="'assistant' must start with"):
        load_family(path, "few_shot")


# --- calibration -------------------------------------------------------------------------
def test_batch_calibration_against_a_hand_computation():
    probs = np.array([[0.6, 0.4], [0.8, 0.2], [0.4, 0.6]])
    # the batch's mean is (0.6, 0.4); each row divided by it, then renormalised
    prior = batch_prior(probs)
    np.testing.assert_allclose(prior, [0.6, 0.4])
    expected = np.array([[1.0, 1.0], [4 / 3, 0.5], [2 / 3, 1.5]])
    expected /= expected.sum(axis=1, keepdims=True)
    calibrated, used = calibrate(probs, "batch")
    np.testing.assert_allclose(calibrated, expected)
    np.testing.assert_allclose(calibrated, [[0.5, 0.5], [8 / 11, 3 / 11], [4 / 13, 9 / 13]])
    np.testing.assert_allclose(used, [0.6, 0.4])
    # the second tweet kept its label, the third's moved where the prior was heavy
    assert calibrated.argmax(axis=1).tolist() == [0, 0, 1]


def test_contextual_calibration_divides_by_the_content_free_prior_and_keeps_unscored_rows():
    probs = np.array([[0.5, 0.5], [np.nan, np.nan]])
    free = np.array([[0.8, 0.2], [0.6, 0.4]])  # prior (0.7, 0.3)
    calibrated, prior = calibrate(probs, "contextual", free)
    np.testing.assert_allclose(prior, [0.7, 0.3])
    np.testing.assert_allclose(calibrated[0], [0.3, 0.7])
    assert np.isnan(calibrated[1]).all()
    np.testing.assert_allclose(divide_by_prior(probs[:1], [1.0, 1.0]), probs[:1])
    with pytest.raises(ValueError, match="content-free"):
        calibrate(probs, "contextual")
    np.testing.assert_allclose(batch_prior(probs), [0.5, 0.5])  # NaN rows left out


# --- selection on validation -------------------------------------------------------------
def _predictions(variants: dict[str, list[str]], gold: list[str]) -> pd.DataFrame:
    rows = []
    for variant, predicted in variants.items():
        for i, (g, p) in enumerate(zip(gold, predicted, strict=True)):
            rows.append({"variant": variant, "id": str(i), "gold": g, "predicted": p})
    return pd.DataFrame(rows)


RECORD = {"variants": [{"id": f"v00{i}", "label": f"x{i}", "values": {}} for i in range(3)]}


def test_the_choice_reads_validation_alone_and_breaks_ties_by_the_stated_rule():
    gold = ["Alegría", "Tristeza", "Otras", "Otras"]
    validation = _predictions(
        {
            "v000": ["Otras", "Otras", "Otras", "Otras"],
            "v001": ["Alegría", "Tristeza", "Otras", "Ira"],  # best macro F1
            "v002": ["Alegría", "Tristeza", "Ira", "Otras"],  # same macro F1, same accuracy
        },
        gold,
    )
    choice = choose_variant(validation, RECORD)
    assert choice["chosen"] == "v001"  # equal on both scores: the earlier variant
    assert choice["variants"] == 3 and "earlier variant" in choice["rule"]
    assert choice["validation"]["tweets"] == 4 and choice["validation"]["split"] == "validation"
    # the choice is a function of the validation predictions: reordered rows, same choice
    assert choose_variant(validation.sample(frac=1, random_state=1), RECORD)["chosen"] == "v001"
    # equal macro F1, the higher accuracy wins
    tie = _predictions({"v000": ["Alegría", "Tristeza", "Ira", "Ira"],
                        "v001": ["Alegría", "Tristeza", "Otras", "Ira"]}, gold)  # fmt: skip
    assert choose_variant(tie, RECORD)["chosen"] == "v001"


def test_the_choose_rule_is_given_no_test_file():
    """The workflow's choice job reads the validation predictions and the record alone."""
    import re

    rules = (REPO / "workflow" / "rules" / "variants.smk").read_text(encoding="utf-8")
    block = rules.split("rule choose_variant:")[1].split("\nrule ")[0]
    inputs = block.split("input:")[1].split("output:")[0]
    assert re.findall(r'VARIANT_FILES\["(\w+)"\]', inputs) == ["validation", "record"]
    study = Study.from_files(REPO)
    assert study.family_pairs() == [
        ("smollm2-135m-instruct", "zero_shot_first_token"),
        ("smollm2-135m-instruct", "few_shot_first_token"),
    ]
    assert study.family_inputs(*study.family_pairs()[0])["validation"] == (
        "data/processed/validation_sample.tsv"
    )


def test_the_chosen_rows_are_the_chosen_variants_test_predictions(tmp_path: Path):
    gold = ["Alegría", "Otras"]
    test = _predictions({"v000": ["Otras", "Otras"], "v001": ["Alegría", "Otras"]}, gold)
    test = test.assign(parsed=True, raw="", truncated=False)
    path = tmp_path / "test.tsv"
    test.to_csv(path, sep="\t", index=False)
    record = {"model": "m", "strategy": "zero_shot_first_token", "variants": [
        {"id": "v000", "label": "base", "values": {}, "run": {"tweets_per_s": 3.0}},
        {"id": "v001", "label": "x", "values": {"instruction": "x"}, "run": {"tweets_per_s": 2.0}},
    ]}  # fmt: skip
    choice = {"chosen": "v000", "label": "base", "values": {}, "variants": 2, "rule": "r",
              "validation": {"f1_macro": {"value": 0.1}}}  # fmt: skip
    out = (str(tmp_path / "p.tsv"), str(tmp_path / "p.json"))
    result = write_chosen(choice, str(path), record, *out)
    assert result.predictions["predicted"].tolist() == ["Otras", "Otras"]
    meta = json.loads((tmp_path / "p.json").read_text())
    assert meta["prompt_choice"]["chosen_on"] == "validation" and meta["tweets"] == 2
    assert meta["validation"] == {"f1_macro": {"value": 0.1}} and meta["tweets_per_s"] == 3.0


def test_the_default_settings_and_the_schema_agree_on_a_family():
    settings = FamilySettings.from_mapping(merged_config(REPO, {})["prompt_variants"])
    assert settings == FamilySettings()
    assert settings.calibration == ("none", "contextual", "batch")


# --- the family job ------------------------------------------------------------------------
@pytest.fixture
def small_splits(tmp_path: Path):
    paths = {}
    for name, frame in (("train", tweets(60)), ("validation", tweets(5, 500)),
                        ("sample", tweets(4, 600))):  # fmt: skip
        paths[name] = str(tmp_path / f"{name}.tsv")
        write_split(frame.reset_index(drop=True), paths[name])
    return paths


def test_a_family_job_loads_its_model_once_and_its_base_variant_is_the_single_prompt(
    tmp_path: Path, small_splits, tiny_llama_dir: Path, monkeypatch
):
    from emoprompt.models import loading

    loads = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    entry = {"source": "local", "prompt_format": "chat", "location": str(tiny_llama_dir)}
    common = dict(model_name="tiny", entry=entry, strategy_name="zero_shot_first_token",
                  prompt_path=str(ZERO), train_path=small_splits["train"],
                  job_threads=1)  # fmt: skip
    settings = {"engine": {"speedups": "none"},
                "prompt_variants": {"calibration": ["none", "contextual", "batch"]}}  # fmt: skip
    record = run_family(
        **common, validation_path=small_splits["validation"],
        sample_path=small_splits["sample"], settings=settings,
        validation_out=str(tmp_path / "v.tsv"), test_out=str(tmp_path / "t.tsv"),
        json_out=str(tmp_path / "r.json"),
    )  # fmt: skip
    assert len(loads) == 1
    assert record["versions"]["torch"]
    assert record["variants"][0]["run"]["prompt_token_limit"] > 0  # measured, as any job
    assert record["family"]["size"] == 24 and record["family"]["prompts"] == 8
    test = read_predictions(str(tmp_path / "t.tsv"))
    validation = read_predictions(str(tmp_path / "v.tsv"))
    assert len(test) == 24 * 4 and len(validation) == 24 * 5
    assert not test["id"].str.startswith("content-free").any()
    # each variant's calibrated scores are its prompt's, divided by the stated prior
    columns = [f"p_{label}" for label in LABELS]
    raw = test[test["variant"] == "v000"][columns].to_numpy()
    batch = test[test["variant"] == "v002"][columns].to_numpy()
    np.testing.assert_allclose(batch, calibrate(raw, "batch")[0], atol=2e-6)
    # the file's own prompt, uncalibrated, is what a single-prompt job predicts
    single = run_prediction(**common, sample_path=small_splits["sample"],
                            settings={"engine": {"speedups": "none"}},
                            tsv_out=str(tmp_path / "s.tsv"),
                            json_out=str(tmp_path / "s.json"))  # fmt: skip
    assert len(loads) == 2
    np.testing.assert_allclose(single.predictions[columns].to_numpy(), raw, atol=2e-6)
    assert single.metadata["prompt_sha256"] == record["variants"][0]["run"]["prompt_sha256"]


def test_the_content_free_rows_follow_the_two_samples():
    validation = pd.DataFrame({"id": ["a"], "tweet": ["x"], "label": ["Ira"]})
    sample = pd.DataFrame({"id": ["b", "c"], "tweet": ["y", "z"], "label": ["Ira", "Otras"]})
    frame = tweets_frame(validation, sample, content_free=True)
    assert frame["split"].tolist() == ["validation", "test", "test", *["content_free"] * 3]
    assert frame["tweet"].tolist()[3:] == ["N/A", "", "[MASK]"]
    assert family_module.SPLITS == ("validation", "test")
