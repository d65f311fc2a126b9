"""Running a strategy over the sample: score or generate, then the predictions.

Scores over a prompt's own labels are mapped onto the seven classes (summing, so the
fine-tuned model's Neutral counts as Otras); generated answers are parsed into a label,
and those with none are counted and given the fallback label, as are the tweets a
server's chat API could not score (no label among its top tokens).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from emoprompt.evaluation.calibration import CONTENT_FREE, divide_by_prior
from emoprompt.evaluation.predictions import (
    Result,
    predictions_frame,
    score_columns,
    timing_record,
)
from emoprompt.evaluation.prompts import build_prompts, content_free_prompt
from emoprompt.evaluation.strategies import BASELINE_MODEL, Settings, Strategy
from emoprompt.inference.backend import END_OF_TURN, Backend
from emoprompt.labels import LABELS
from emoprompt.prompting.parsing import parse_label
from emoprompt.prompting.prompt_file import PromptFile
from emoprompt.prompting.render import PromptParts


def calibrated(
    backend: Backend,
    probs: np.ndarray,
    content_free: Sequence[PromptParts],
    labels: Sequence[str],
    normalize: bool,
    end_token: str | None = END_OF_TURN,
) -> tuple[np.ndarray, np.ndarray]:
    """Contextual calibration (Zhao et al., 2021): ``probs`` divided by the prior, the
    mean label probabilities of the ``content_free`` prompts, renormalised; and the prior."""
    logprobs = backend.label_logprobs(
        list(content_free), labels, normalize=normalize, end_token=end_token
    )
    prior = softmax(logprobs).mean(axis=0)
    return divide_by_prior(probs, prior), prior


def softmax(values: np.ndarray) -> np.ndarray:
    """Row-wise softmax (log-likelihoods to probabilities over the labels)."""
    shifted = values - values.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def to_seven(probs: np.ndarray, labels: Sequence[str], label_map: Mapping[str, str]) -> np.ndarray:
    """Map probabilities over a prompt's own labels onto the seven classes (summing)."""
    out = np.zeros((probs.shape[0], len(LABELS)))
    for j, label in enumerate(labels):
        out[:, LABELS.index(label_map[label])] += probs[:, j]
    return out


def end_of_answer(prompt: PromptFile) -> str | None:
    """What ends an answer, scored after each label: the end of the turn, or for a base
    model's plain text the end of the line (its next line would start another block)."""
    return "\n" if prompt.format == "text" else END_OF_TURN


def _generated(backend: Backend, parts, prompt: PromptFile, settings: Settings):
    """Generate, then parse: (predicted classes, parsed flags, raw answers). A base
    model's answer is its first line (it would go on with another block)."""
    labels, label_map = prompt.labels, prompt.label_map
    generations = backend.generate(
        parts,
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature,
        seed=settings.seed,
        stop_at_newline=prompt.format == "text",
    )
    raw = [g.text for g in generations]
    answers = [parse_label(text, labels, fallback=None) for text in raw]
    parsed = [a.parsed for a in answers]
    predicted = [label_map[a.label] if a.parsed else settings.fallback_label for a in answers]
    return predicted, parsed, raw


def _scored(strategy, backend, tokenizer, prompt, train, sample, parts, settings, record):
    """Probabilities over the prompt's labels (first token, or calibrated likelihoods)."""
    labels, answers = prompt.labels, prompt.answers()  # answers: the labels as written
    if strategy.method == "first_token":
        record["label_first_tokens"] = backend.label_first_tokens(answers, parts[0].text)
        return backend.first_token_probs(parts, answers)
    end = end_of_answer(prompt)
    normalize = settings.length_normalize
    probs = softmax(backend.label_logprobs(parts, answers, normalize=normalize, end_token=end))
    if settings.calibrate:
        content_free = [
            content_free_prompt(strategy, prompt, tokenizer, train, sample, text, settings)
            for text in CONTENT_FREE
        ]
        probs, prior = calibrated(backend, probs, content_free, answers, normalize, end)
        record["calibration_prior"] = dict(zip(labels, prior.round(6).tolist(), strict=True))
    return probs


def _method_settings(strategy: Strategy, settings: Settings) -> dict[str, Any]:
    decoding = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "temperature": settings.temperature,
        "seed": settings.seed,
    }
    scoring = {"length_normalize": settings.length_normalize, "calibrate": settings.calibrate}
    return {
        "decoding": decoding if strategy.method == "generate" else None,
        "scoring": scoring if strategy.method == "label_likelihood" else None,
    }


def run_llm_strategy(
    strategy: Strategy,
    backend: Backend,
    tokenizer: Any,
    prompt: PromptFile,
    train: pd.DataFrame,
    sample: pd.DataFrame,
    settings: Settings,
    truncated: Sequence[bool] | None = None,
) -> Result:
    """Run one prompting strategy over the sample with a backend; return predictions.

    ``truncated`` flags the tweets that were cut to fit the context (their cut text is
    in ``sample``)."""
    labels, label_map = prompt.labels, prompt.label_map
    parts, record = build_prompts(
        strategy, prompt, tokenizer, train, sample, settings.chat_template_kwargs
    )
    start = time.perf_counter()
    probs7 = np.full((len(parts), len(LABELS)), np.nan)
    if strategy.method == "generate":
        predicted, parsed, raw = _generated(backend, parts, prompt, settings)
    else:
        probs = _scored(
            strategy, backend, tokenizer, prompt, train, sample, parts, settings, record
        )
        # A row a server could not score (NaN: no label among a chat API's top tokens)
        # gets the fallback label and counts as unparsed, as an answer with no label does.
        unscored = np.isnan(probs).any(axis=1)
        probs7 = to_seven(np.where(unscored[:, None], 0.0, probs), labels, label_map)
        probs7[unscored] = np.nan
        best = np.nan_to_num(probs7, nan=0.0).argmax(axis=1)
        predicted = [
            settings.fallback_label if none else LABELS[i]
            for none, i in zip(unscored, best, strict=True)
        ]
        parsed, raw = (~unscored).tolist(), [""] * len(parts)
    seconds = time.perf_counter() - start

    cut = [False] * len(parts) if truncated is None else list(truncated)
    frame = predictions_frame(sample, predicted, parsed, raw, cut)
    for j, column in enumerate(score_columns()):
        frame[column] = probs7[:, j]
    metadata = {
        "strategy": strategy.name,
        "method": strategy.method,
        "prompt_family": strategy.family,
        "prompt_file": prompt.path,
        **record,
        "labels": list(labels),
        "label_map": label_map,
        **_method_settings(strategy, settings),
        "fallback_label": settings.fallback_label,
        "unparsed": int(len(parsed) - sum(parsed)),
        "truncated": int(sum(cut)),
        "backend": backend.describe(),
        "tokens_in": int(backend.stats.get("tokens_in", 0)),
        "tokens_out": int(backend.stats.get("tokens_out", 0)),
        **timing_record(len(frame), seconds),
    }
    return Result(frame, metadata)


def run_baseline(train: pd.DataFrame, sample: pd.DataFrame, seed: int = 0) -> Result:
    """The TF-IDF + logistic regression anchor, with the same output files as the LLMs."""
    # scikit-learn only here: the prompting strategies run without it (a GPU machine)
    from emoprompt.evaluation.baseline import predict_proba_frame, train_tfidf_baseline

    start = time.perf_counter()
    pipeline = train_tfidf_baseline(train, seed=seed)
    scores = predict_proba_frame(pipeline, sample)
    seconds = time.perf_counter() - start
    frame = predictions_frame(sample, scores["predicted"].tolist(), True, "")
    for label, column in zip(LABELS, score_columns(), strict=True):
        frame[column] = scores[label].to_numpy()
    metadata = {
        "model": BASELINE_MODEL,
        "strategy": "baseline_tfidf",
        "method": "tfidf",
        "description": "TF-IDF word 1-2 + char 2-5 grams, class-balanced logistic regression",
        "train_tweets": len(train),
        "seed": seed,
        "device": "cpu",
        "unparsed": 0,
        **timing_record(len(frame), seconds),
    }
    return Result(frame, metadata)
