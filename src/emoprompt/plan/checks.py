"""What the workflow refuses when it starts (a dry run included): prompt files that
cannot be read, few-shot settings that cannot give their shots. Checks that need the
prepared splits run in the job, before its model loads (``evaluation.job``)."""

from __future__ import annotations

from typing import Any

from emoprompt.evaluation.strategies import STRATEGIES
from emoprompt.plan.study import PROMPT_FILES, Study
from emoprompt.prompting.fewshot import check_calibration
from emoprompt.prompting.fewshot import check_settings as check_few_shot
from emoprompt.prompting.variants import load_family


def check_prompt_files(study: Study, train: Any = None, test: Any = None) -> list[str]:
    """Refuse (``PromptError``) a malformed prompt file of a configured strategy, or
    few-shot settings that cannot work; with the splits given (``train``, ``test``),
    shots are checked against them too. Returns warnings (an empty system prompt)."""
    warnings = []
    config = study.config
    for family in study.families():
        prompt = load_family(study.root / PROMPT_FILES[family], family)
        if "system" in prompt.settings and not prompt.settings["system"].strip():
            warnings.append(
                f"{prompt.path}: 'system' is empty: the model is not told the task or the labels"
            )
        if family.startswith("few_shot"):
            check_few_shot(prompt, train, test)
            calibrated = any(
                STRATEGIES[s].family == "few_shot" and STRATEGIES[s].method == "label_likelihood"
                for s in config["strategies"]
            )
            check_calibration(prompt, calibrated and config["scoring"].get("calibrate"))
            contextual = "contextual" in config["prompt_variants"]["calibration"] and any(
                STRATEGIES[s].family == "few_shot" and STRATEGIES[s].method != "generate"
                for s in study.family_strategies()
            )
            check_calibration(prompt, contextual, "prompt_variants.calibration")
    return warnings
