"""One prompt family job: every variant of a strategy's prompt, scored on the
validation sample and on the evaluation sample, with one model load.

Variants that write the same prompt (they differ in calibration alone) share one pass
over the tweets; each prompt variant's tweets go to the engine in one call, so its
shared prefix is computed once. Calibration is applied afterwards to the same scores:
``batch`` costs nothing, ``contextual`` three content-free prompts.

The job writes the variants' predictions on each split (a ``variant`` column beside
the usual prediction columns) and a record of every variant (its axis values, the
prompt it asked, its speed); choosing among them is another job
(:mod:`emoprompt.evaluation.selection`), which reads the validation split alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from emoprompt.data.splits import read_split
from emoprompt.evaluation.calibration import CONTENT_FREE, calibrate
from emoprompt.evaluation.context import truncation_record
from emoprompt.evaluation.job import (
    JobModel,
    check_prompt,
    job_prompt,
    job_settings,
    provenance_record,
)
from emoprompt.evaluation.predictions import score_columns, write_predictions
from emoprompt.evaluation.runner import run_llm_strategy
from emoprompt.evaluation.strategies import STRATEGIES
from emoprompt.infra.files import sha256_file, write_json
from emoprompt.infra.provenance import library_versions
from emoprompt.infra.runtime import configure_cpu
from emoprompt.labels import LABELS
from emoprompt.models.spec import ModelSpec
from emoprompt.prompting.fewshot import check_calibration
from emoprompt.prompting.variants import Variant, apply, expand, variant_record

log = logging.getLogger(__name__)

SPLITS = ("validation", "test")
CONTENT_FREE_SPLIT = "content_free"


@dataclasses.dataclass(frozen=True)
class FamilySettings:
    """How a family is drawn: the prompt axes it varies, the calibrations of the
    scoring strategies, a seeded sample of at most ``max_variants`` variants (None:
    all), and its seed."""

    strategies: tuple[str, ...] = ("zero_shot_first_token", "few_shot_first_token")
    axes: tuple[str, ...] = ("instruction", "verbalizer")
    calibration: tuple[str, ...] = ("none", "contextual", "batch")
    max_variants: int | None = None
    validation_size: int | str = 100
    seed: int = 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> FamilySettings:
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in (values or {}).items()}
        return cls(**{k: v for k, v in given.items() if k in fields})


def family_variants(prompt, method: str, family: FamilySettings) -> list[Variant]:
    """The variants a strategy of ``method`` runs: calibrations for the scoring methods
    only (a generated answer has no probabilities to calibrate)."""
    calibrations = ("none",) if method == "generate" else family.calibration
    return expand(
        prompt, calibrations, axes=family.axes, max_variants=family.max_variants, seed=family.seed
    )


def grouped(variants: Sequence[Variant]) -> dict[tuple, list[Variant]]:
    """Variants by the prompt they write, in order."""
    groups: dict[tuple, list[Variant]] = {}
    for variant in variants:
        groups.setdefault(variant.prompt_key, []).append(variant)
    return groups


def tweets_frame(validation: pd.DataFrame, sample: pd.DataFrame, content_free: bool):
    """The validation and evaluation samples in one frame (a ``split`` column), and the
    content-free stand-ins of contextual calibration after them."""
    frames = [validation.assign(split="validation"), sample.assign(split="test")]
    if content_free:
        stand_in = sample.iloc[[0] * len(CONTENT_FREE)].assign(
            id=[f"content-free-{i}" for i in range(len(CONTENT_FREE))],
            tweet=list(CONTENT_FREE),
            split=CONTENT_FREE_SPLIT,
        )
        frames.append(stand_in)
    return pd.concat(frames, ignore_index=True)


def calibrated_rows(frame: pd.DataFrame, splits: Sequence[str], variant: Variant, fallback: str):
    """The predictions of one variant: its prompt's scores calibrated as it says, each
    split by its own batch; the content-free rows dropped. And the prior each split was
    divided by (none for an uncalibrated variant)."""
    columns = score_columns()
    free = frame[frame["split"] == CONTENT_FREE_SPLIT][columns].to_numpy()
    out, priors = [], {}
    for split in splits:
        rows = frame[frame["split"] == split].copy()
        if variant.calibration != "none":
            probs, prior = calibrate(rows[columns].to_numpy(), variant.calibration, free)
            priors[split] = dict(zip(LABELS, np.round(prior, 6).tolist(), strict=True))
            rows[columns] = probs
            scored = ~np.isnan(probs).any(axis=1)
            best = np.nan_to_num(probs, nan=0.0).argmax(axis=1)
            rows["predicted"] = [
                LABELS[i] if ok else fallback for ok, i in zip(scored, best, strict=True)
            ]
        out.append(rows.assign(variant=variant.id))
    return out, priors


def score_variants(strategy, model, train, tweets, groups, fitted, run_settings):
    """Each prompt variant's pass over the tweets, then each of its calibrations: the
    predictions per split, and each variant's record."""
    engine, tokenizer, context = model
    rows: dict[str, list[pd.DataFrame]] = {split: [] for split in SPLITS}
    records = []
    for key, members in tqdm(groups.items(), desc=f"{strategy.name} variants", unit="prompt"):
        written, fit = fitted[key]
        result = run_llm_strategy(
            *(strategy, engine, tokenizer, written, train, fit.sample, run_settings),
            truncated=fit.truncated,
        )
        frame = result.predictions.assign(split=tweets["split"].to_numpy())
        log.info("%s: %.2f tweets/s", members[0].label, result.metadata["tweets_per_s"] or 0)
        for variant in members:
            parts, priors = calibrated_rows(frame, SPLITS, variant, run_settings.fallback_label)
            for split, part in zip(SPLITS, parts, strict=True):
                rows[split].append(part)
            run = {
                **truncation_record(fit, context),
                **_run_record(result.metadata),
                "calibration_prior": priors or None,
            }
            records.append({**variant_record(variant), "run": run})
    return rows, records


def run_family(
    *,
    model_name: str,
    entry: Mapping[str, Any],
    strategy_name: str,
    prompt_path: str,
    train_path: str,
    validation_path: str,
    sample_path: str,
    settings: Mapping[str, Any],
    job_threads: int,
    validation_out: str,
    test_out: str,
    json_out: str,
    workflow_dir: str | None = None,
) -> dict[str, Any]:
    """Everything a `predict_family` job does: every prompt variant's prompts measured
    before the model loads, the model loaded once, each prompt variant scored on both
    samples, each calibration applied; the predictions and the record written."""
    strategy = STRATEGIES[strategy_name]
    family = FamilySettings.from_mapping(settings.get("prompt_variants"))
    engine_settings = settings.get("engine") or {}
    threads = configure_cpu(engine_settings.get("threads", "auto"), job_threads)
    spec = ModelSpec.of(entry)
    prompt = job_prompt(strategy, prompt_path, settings, spec, family=True)
    variants = family_variants(prompt, strategy.method, family)
    groups = grouped(variants)
    train = read_split(train_path)
    validation, sample = read_split(validation_path), read_split(sample_path)
    contextual = any(v.calibration == "contextual" for v in variants)
    tweets = tweets_frame(validation, sample, contextual)
    run_settings = dataclasses.replace(job_settings(settings, spec), calibrate=False)
    model = JobModel.open(model_name, spec, settings, prompt)
    fitted = {}
    for key, members in groups.items():  # every prompt checked before the model loads
        written = apply(prompt, members[0])
        check_prompt(strategy, written, train, tweets, run_settings)
        if strategy.family == "few_shot":
            check_calibration(written, contextual, "prompt_variants.calibration")
        fitted[key] = (written, model.fit(strategy, written, train, tweets, run_settings))
    engine, tokenizer, info, batch_size = model.load(engine_settings)
    log.info(
        "%s / %s: %d variants (%d prompts) x %d validation + %d test tweets, batch %d",
        *(model_name, strategy_name, len(variants), len(groups), len(validation), len(sample)),
        batch_size,
    )
    rows, records = score_variants(
        strategy, (engine, tokenizer, model.context), train, tweets, groups, fitted, run_settings
    )
    record = {
        "model": model_name,
        "strategy": strategy_name,
        "method": strategy.method,
        **{k: v for k, v in info.items() if k != "name"},
        "batch_size": batch_size,
        "threads": threads,
        "engine_stats": dict(engine.stats),
        "family": {
            **{k: v for k, v in dataclasses.asdict(family).items() if k != "strategies"},
            "prompts": len(groups),
            "size": len(variants),
        },
        "validation_sample": _sample_record(validation_path, validation),
        "versions": library_versions(),
        "variants": records,
        **provenance_record(sample_path, settings, workflow_dir),
    }
    for split, out in zip(SPLITS, (validation_out, test_out), strict=True):
        _write_rows(pd.concat(rows[split], ignore_index=True), out)
    write_json(json_out, record)
    return record


def _run_record(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A prompt variant's run record, less what the job record holds once."""
    return {k: v for k, v in metadata.items() if k not in ("versions",)}


def _sample_record(path: str, frame: pd.DataFrame) -> dict[str, Any]:
    return {"file": path, "sha256": sha256_file(path), "tweets": len(frame)}


def _write_rows(frame: pd.DataFrame, path: str) -> None:
    columns = ["variant", *[c for c in frame.columns if c not in ("variant", "split")]]
    write_predictions(frame[columns], path)
