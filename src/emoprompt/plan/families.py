"""The prompt families of a study: which (model, strategy) pairs run their prompt file's
variants, their jobs' inputs and settings, and their files (a part of
:class:`emoprompt.plan.study.Study`)."""

from __future__ import annotations

import re
from typing import Any

#: The validation tweets every variant of a prompt family is scored on.
VALIDATION_SAMPLE = "data/processed/validation_sample.tsv"
#: A prompt family's files: its variants' predictions per split, their record, the choice.
VARIANT_FILES = {
    "validation": "results/variants/{model}/{strategy}/validation.tsv",
    "test": "results/variants/{model}/{strategy}/test.tsv",
    "record": "results/variants/{model}/{strategy}/variants.json",
    "choice": "results/variants/{model}/{strategy}/choice.json",
}
SENSITIVITY_OUTPUTS = [
    "results/prompt_sensitivity.md",
    "results/prompt_sensitivity.csv",
    "results/figures/prompt_sensitivity.png",
]


def pattern(names: list[str]) -> str:
    """A wildcard constraint that matches exactly ``names`` (nothing when empty)."""
    return "|".join(re.escape(name) for name in names) or "^$"


class FamilyPlan:
    """The study's prompt families; mixed into :class:`~emoprompt.plan.study.Study`,
    whose configuration, pairs and inputs it reads."""

    def family_strategies(self) -> list[str]:
        """The configured strategies that run their prompt file's family."""
        listed = self.config["prompt_variants"]["strategies"]
        return [s for s in self.config["strategies"] if s in listed]

    def family_pattern(self) -> str:
        return pattern(self.family_strategies())

    def family_pairs(self) -> list[tuple[str, str]]:
        """(model, strategy) pairs whose row is a family's variant chosen on validation."""
        families = set(self.family_strategies())
        return [(m, s) for m, s in self.prediction_pairs() if s in families]

    def family_inputs(self, model: str, strategy: str) -> dict[str, Any]:
        return {**self.predict_inputs(model, strategy), "validation": VALIDATION_SAMPLE}

    def family_settings(self, model: str, strategy: str) -> dict[str, Any]:
        variants = {k: v for k, v in self.config["prompt_variants"].items() if k != "strategies"}
        return {**self.predict_settings(model, strategy), "prompt_variants": variants}

    def variant_files(self, kind: str) -> list[str]:
        """One of a family's files (:data:`VARIANT_FILES`) for every family pair."""
        return [VARIANT_FILES[kind].format(model=m, strategy=s) for m, s in self.family_pairs()]

    def sensitivity_inputs(self) -> dict[str, list[str]]:
        """The spread report reads every variant's test predictions, the choices and the
        chosen rows' metrics (their intervals), and the baseline's where it runs."""
        baseline = self.comparison_baseline()
        return {
            "test": self.variant_files("test"),
            "choices": self.variant_files("choice"),
            "metrics": [f"results/metrics/{m}/{s}.json" for m, s in self.family_pairs()],
            "baseline": [f"results/metrics/{baseline}.json"] if baseline else [],
        }

    def sensitivity_outputs(self) -> list[str]:
        return list(SENSITIVITY_OUTPUTS) if self.family_pairs() else []
