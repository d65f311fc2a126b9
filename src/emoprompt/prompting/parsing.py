"""Turning a model's free-text answer into one of the class labels.

The rule is deliberately simple and documented so that results can be reproduced:

* Text is compared case- and accent-insensitively (``alegria`` == ``Alegría`` == ``ALEGRÍA``).
* Each label is recognised by its own name and, when it is one of the known classes, by the
  Spanish and English names, variants and inflections in :data:`VARIANTS` (``feliz``, ``joy``,
  ``enfadado``, ``neutral``...).
* Only whole words match: ``mirada`` does not contain ``ira`` and ``otras`` is not ``otra``.
* **The first label mentioned wins**, by position in the text: ``"No es alegría, es tristeza"``
  parses as Alegría. Small models mostly answer with the label first; reading negations or
  explanations would make the parser a second classifier.
* Wrappers need no special casing: punctuation, markdown (``**Ira**``), quotes, ``Respuesta:``
  or ``La emoción es:`` hold no label word, so they are skipped by the word search.
* An answer with no label gives ``parsed=False`` and the ``fallback`` label.

Known costs of the rule: accent-insensitivity makes the verb form ``irá`` read as Ira, and a
label word used in passing before the answer (``"por otro lado, ..."``) is taken as the answer.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from emoprompt.labels import LABELS

# Surface forms per canonical Spanish class name, written with their accents for readability
# (they are normalised when the pattern is built). Inflections (gender, number) are listed
# because small models often answer with an adjective ("Está triste", "sorprendida"). Kept out
# of the formatter: one line per group of forms reads better than one form per line.
# fmt: off
VARIANTS: dict[str, tuple[str, ...]] = {
    "Alegría": (
        "alegría", "alegrías", "alegre", "alegres", "feliz", "felices", "felicidad",
        "contento", "contenta", "contentos", "contentas",
        "joy", "joyful", "happiness", "happy",
    ),
    "Tristeza": ("tristeza", "tristezas", "triste", "tristes", "sadness", "sad"),
    "Desagrado": (
        "desagrado", "asco", "disgusto", "repugnancia",
        "asqueado", "asqueada", "asqueados", "asqueadas",
        "disgust", "disgusted",
    ),
    "Ira": (
        "ira", "enojo", "enfado", "rabia", "furia",
        "enojado", "enojada", "enojados", "enojadas",
        "enfadado", "enfadada", "enfadados", "enfadadas",
        "furioso", "furiosa", "furiosos", "furiosas",
        "anger", "angry", "rage",
    ),
    "Miedo": (
        "miedo", "temor", "terror",
        "asustado", "asustada", "asustados", "asustadas",
        "fear", "afraid", "scared",
    ),
    "Sorpresa": (
        "sorpresa", "sorprendido", "sorprendida", "sorprendidos", "sorprendidas", "asombro",
        "asombrado", "asombrada", "surprise", "surprised",
    ),
    "Otras": (
        "otras", "otra", "otro", "otros", "ninguna", "ninguno", "neutral", "neutro", "neutra",
        "others", "other", "none",
    ),
}
# fmt: on


@dataclass(frozen=True)
class ParsedLabel:
    """A parsed answer: the label (or the fallback), whether a label was found, and the text
    that matched (as written in the answer, ``None`` when nothing matched)."""

    label: str | None
    parsed: bool
    matched: str | None


def normalise(text: str) -> str:
    """Casefold and drop accents (``"ALEGRÍA"`` -> ``"alegria"``)."""
    return "".join(_normalise_char(c) for c in text)


def _normalise_char(char: str) -> str:
    decomposed = unicodedata.normalize("NFKD", char.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _normalise_with_offsets(text: str) -> tuple[str, list[int]]:
    """Normalise ``text`` and return, for each normalised character, its index in ``text``.

    One original character may become zero or several normalised ones (``ß`` -> ``ss``), so
    the offsets are what lets ``matched`` quote the answer as the model wrote it.
    """
    pieces: list[str] = []
    offsets: list[int] = []
    for index, char in enumerate(text):
        norm = _normalise_char(char)
        pieces.append(norm)
        offsets.extend([index] * len(norm))
    return "".join(pieces), offsets


def _known_class(label: str) -> str | None:
    """The canonical class whose name or variants include ``label`` (``"joy"``, ``"Neutral"``)."""
    key = normalise(label.strip())
    for canonical, variants in VARIANTS.items():
        if key == normalise(canonical) or key in {normalise(v) for v in variants}:
            return canonical
    return None


@lru_cache(maxsize=64)
def _compile(labels: tuple[str, ...]) -> tuple[re.Pattern[str], dict[str, str]]:
    """A whole-word pattern for every surface form of ``labels`` and a form -> label map."""
    if not labels:
        raise ValueError("labels must not be empty")
    form_to_label: dict[str, str] = {}
    # A label's own name always means that label, even if it is also a variant of another one
    # (a set holding both "Otras" and "Neutral" keeps them apart).
    for label in labels:
        form_to_label.setdefault(normalise(label.strip()), label)
    # Variants go to the first label (in ``labels`` order) of the class they belong to.
    for label in labels:
        canonical = _known_class(label)
        if canonical is None:
            continue
        for form in (canonical, *VARIANTS[canonical]):
            form_to_label.setdefault(normalise(form), label)
    # Longest first so that a multi-word form wins over a word inside it at the same position.
    forms = sorted(form_to_label, key=lambda f: (-len(f), f))
    alternation = "|".join(re.escape(f) for f in forms)
    # Lookarounds instead of \b so that forms that start or end in a non-word character still
    # get whole-word boundaries; accents are already gone, so "mirada" cannot hide "ira".
    pattern = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)")
    return pattern, form_to_label


def parse_label(
    text: str, labels: Sequence[str] = LABELS, fallback: str | None = "Otras"
) -> ParsedLabel:
    """Parse a generated answer into one of ``labels``; the first label mentioned wins.

    ``labels`` may be any label set (the seven Spanish classes, English names, a fine-tuned
    model's own set with ``Neutral``); a label with no known variants matches its own name.
    ``fallback`` is returned, with ``parsed=False``, when no label is found; it is not checked
    against ``labels`` so that callers can map unparsed answers to any class or to ``None``.
    """
    pattern, form_to_label = _compile(tuple(labels))
    normalised, offsets = _normalise_with_offsets(text or "")
    found = pattern.search(normalised)
    if found is None:
        return ParsedLabel(label=fallback, parsed=False, matched=None)
    start = offsets[found.start()]
    end = offsets[found.end() - 1] + 1
    return ParsedLabel(label=form_to_label[found.group()], parsed=True, matched=text[start:end])


def count_unparsed(results: Iterable[ParsedLabel]) -> int:
    """How many answers held no label (and were given the fallback)."""
    return sum(1 for result in results if not result.parsed)
