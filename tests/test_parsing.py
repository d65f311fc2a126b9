"""Tests for turning generated answers into labels."""

from __future__ import annotations

import pytest

from emoprompt.labels import LABELS
from emoprompt.prompting.parsing import (
    VARIANTS,
    ParsedLabel,
    count_unparsed,
    normalise,
    parse_label,
)

# The fine-tuned model's own label set: six classes, "Neutral" standing for Otras.
FINETUNED_LABELS = ("Alegría", "Tristeza", "Ira", "Miedo", "Sorpresa", "Neutral")


@pytest.mark.parametrize(
    ("text", "label", "matched"),
    [
        # Plain names, case and accents.
        ("Alegría", "Alegría", "Alegría"),
        ("alegria", "Alegría", "alegria"),
        ("ALEGRÍA", "Alegría", "ALEGRÍA"),
        ("ALEGRIA", "Alegría", "ALEGRIA"),
        ("Tristeza", "Tristeza", "Tristeza"),
        ("desagrado", "Desagrado", "desagrado"),
        ("IRA", "Ira", "IRA"),
        ("Miedo", "Miedo", "Miedo"),
        ("sorpresa", "Sorpresa", "sorpresa"),
        ("Otras", "Otras", "Otras"),
        # Decomposed accent (e + combining acute) as some tokenizers emit it.
        ("Alegri\u0301a", "Alegría", "Alegri\u0301a"),
        # Wrappers.
        ("Respuesta: Ira", "Ira", "Ira"),
        ("**Alegría**", "Alegría", "Alegría"),
        ("La emoción es: tristeza.", "Tristeza", "tristeza"),
        ("\n\n   Miedo\n", "Miedo", "Miedo"),
        ('"Sorpresa"', "Sorpresa", "Sorpresa"),
        ("«desagrado»", "Desagrado", "desagrado"),
        ("`Ira`", "Ira", "Ira"),
        ("Emoción: **Otras**", "Otras", "Otras"),
        ("1. Tristeza", "Tristeza", "Tristeza"),
        ("#Alegría", "Alegría", "Alegría"),
        # Spanish variants and inflections.
        ("El autor está feliz", "Alegría", "feliz"),
        ("Se siente triste", "Tristeza", "triste"),
        ("Expresa asco", "Desagrado", "asco"),
        ("repugnancia", "Desagrado", "repugnancia"),
        ("Está enfadada", "Ira", "enfadada"),
        ("enojo", "Ira", "enojo"),
        ("Rabia", "Ira", "Rabia"),
        ("temor", "Miedo", "temor"),
        ("Está sorprendido", "Sorpresa", "sorprendido"),
        ("asombro", "Sorpresa", "asombro"),
        ("Ninguna", "Otras", "Ninguna"),
        ("neutral", "Otras", "neutral"),
        ("Neutro", "Otras", "Neutro"),
        ("Otra", "Otras", "Otra"),
        # English answers.
        ("joy", "Alegría", "joy"),
        ("Happiness", "Alegría", "Happiness"),
        ("The emotion is: sadness", "Tristeza", "sadness"),
        ("Disgust", "Desagrado", "Disgust"),
        ("ANGER", "Ira", "ANGER"),
        ("The author is angry.", "Ira", "angry"),
        ("fear", "Miedo", "fear"),
        ("Surprised", "Sorpresa", "Surprised"),
        ("Others", "Otras", "Others"),
        ("None", "Otras", "None"),
        # Whole words only: "mirada" holds "ira", "sadness" holds "sad", "otras" holds "otra".
        ("Su mirada transmite tristeza", "Tristeza", "tristeza"),
        ("Otras emociones", "Otras", "Otras"),
        ("Sadness", "Tristeza", "Sadness"),
        ("terrorismo y miedo", "Miedo", "miedo"),
        # The first label mentioned wins, even when negated: the documented rule.
        ("No es alegría, es tristeza", "Alegría", "alegría"),
        ("Tristeza o quizá ira", "Tristeza", "Tristeza"),
        ("Respuesta: Ira\n\nAlegría", "Ira", "Ira"),
        ("Creo que la respuesta es sorpresa, no miedo", "Sorpresa", "sorpresa"),
    ],
)
def test_parse_label_finds_the_label(text: str, label: str, matched: str) -> None:
    assert parse_label(text) == ParsedLabel(label=label, parsed=True, matched=matched)


@pytest.mark.parametrize(
    "text",
    ["", "   \n", "No lo sé.", "Su mirada lo dice todo", "Irán mañana", "🙂", "alegriaa"],
)
def test_answer_without_label_falls_back(text: str) -> None:
    assert parse_label(text) == ParsedLabel(label="Otras", parsed=False, matched=None)


def test_fallback_can_be_any_label_or_none() -> None:
    assert parse_label("No lo sé", fallback="Alegría") == ParsedLabel("Alegría", False, None)
    assert parse_label("No lo sé", fallback=None) == ParsedLabel(None, False, None)
    # The fallback is not used when a label is found.
    assert parse_label("Ira", fallback=None).label == "Ira"


def test_first_mention_is_by_position_not_by_label_order() -> None:
    # Otras comes last in LABELS, but first in the text.
    assert parse_label("otras cosas, no alegría").label == "Otras"
    assert parse_label("alegría, no otras cosas").label == "Alegría"


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Neutral", "Neutral"),
        ("neutro", "Neutral"),
        ("Otras", "Neutral"),
        ("others", "Neutral"),
        ("Alegría", "Alegría"),
        ("joy", "Alegría"),
        ("enfado", "Ira"),
    ],
)
def test_finetuned_label_set(text: str, label: str) -> None:
    assert parse_label(text, labels=FINETUNED_LABELS, fallback="Neutral").label == label


def test_label_absent_from_the_set_is_not_parsed() -> None:
    # Desagrado is not among the fine-tuned model's labels, so "asco" names nothing there.
    result = parse_label("asco", labels=FINETUNED_LABELS, fallback="Neutral")
    assert result == ParsedLabel("Neutral", False, None)
    # The first label *of the set* wins, skipping words of classes outside it.
    assert parse_label("asco y miedo", labels=FINETUNED_LABELS).label == "Miedo"


def test_english_label_set_returns_english_names() -> None:
    english = ("joy", "sadness", "disgust", "anger", "fear", "surprise", "others")
    assert parse_label("Alegría", labels=english).label == "joy"
    assert parse_label("Está enojado", labels=english).label == "anger"
    assert parse_label("Otras", labels=english).label == "others"


def test_label_without_known_variants_matches_its_own_name() -> None:
    labels = ("Positivo", "Negativo", "Amor")
    assert parse_label("Es AMOR", labels=labels) == ParsedLabel("Amor", True, "AMOR")
    assert parse_label("negativo", labels=labels).label == "Negativo"
    # Whole words still: "amores" is not "amor", and no variants of other classes leak in.
    assert parse_label("amores y alegría", labels=labels, fallback=None).parsed is False


def test_own_name_beats_a_variant_of_another_label() -> None:
    # "Neutral" is a variant of Otras, but here it is a label of its own.
    labels = (*LABELS, "Neutral")
    assert parse_label("neutral", labels=labels).label == "Neutral"
    assert parse_label("ninguna", labels=labels).label == "Otras"


def test_every_variant_parses_to_its_class() -> None:
    for canonical, variants in VARIANTS.items():
        assert canonical in LABELS
        for variant in variants:
            for surface in (variant, variant.upper(), normalise(variant)):
                result = parse_label(f"Respuesta: {surface}.")
                assert result.label == canonical, surface
                assert result.matched == surface


def test_variants_do_not_overlap() -> None:
    seen: dict[str, str] = {}
    for canonical, variants in VARIANTS.items():
        for variant in variants:
            key = normalise(variant)
            assert seen.setdefault(key, canonical) == canonical, variant


def test_normalise() -> None:
    assert normalise("ALEGRÍA Ñandú") == "alegria nandu"


def test_empty_label_set_is_rejected() -> None:
    with pytest.raises(ValueError, match="labels"):
        parse_label("Ira", labels=())


def test_count_unparsed() -> None:
    results = [parse_label(t) for t in ("Ira", "???", "tristeza", "", "nada")]
    assert count_unparsed(results) == 3
    assert count_unparsed([]) == 0
    assert count_unparsed(iter(results)) == 3
