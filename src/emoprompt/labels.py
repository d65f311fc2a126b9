"""The seven EmoEvalEs classes, their Spanish prompt names and their fixed order."""

from __future__ import annotations

# Order matters: tables, confusion matrices and score columns follow it.
ENGLISH_TO_SPANISH: dict[str, str] = {
    "joy": "Alegría",
    "sadness": "Tristeza",
    "disgust": "Desagrado",
    "anger": "Ira",
    "fear": "Miedo",
    "surprise": "Sorpresa",
    "others": "Otras",
}
LABELS: tuple[str, ...] = tuple(ENGLISH_TO_SPANISH.values())
SPANISH_TO_ENGLISH: dict[str, str] = {es: en for en, es in ENGLISH_TO_SPANISH.items()}


def to_spanish(label: str) -> str:
    """Map a dataset label (English, or already Spanish) to its Spanish name.

    Raises ``ValueError`` for anything that is not one of the seven classes.
    """
    key = label.strip()
    if key.lower() in ENGLISH_TO_SPANISH:
        return ENGLISH_TO_SPANISH[key.lower()]
    if key in SPANISH_TO_ENGLISH:
        return key
    raise ValueError(f"unknown label {label!r}; expected one of {', '.join(ENGLISH_TO_SPANISH)}")
