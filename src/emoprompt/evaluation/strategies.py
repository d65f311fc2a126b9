"""The prompting strategies: build each tweet's prompt, score or generate, write predictions.

Each strategy is one (prompt family, method) pair. The five of the course notebook
are zero/few-shot x generate/first-token and the fine-tuned model's first token;
whole-label likelihood and a TF-IDF baseline are added beside them.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import pandas as pd

from emoprompt.infra.files import atomic_open, write_json
from emoprompt.labels import LABELS
from emoprompt.prompting.parsing import parse_label
from emoprompt.prompting.render import (
    PromptFile,
    PromptParts,
    chat_messages,
    prompt_sha256,
    render_chat,
    render_plain,
)

log = logging.getLogger(__name__)

# Content-free inputs for contextual calibration (Zhao et al., 2021).
CONTENT_FREE = ("N/A", "", "[MASK]")


@dataclass(frozen=True)
class Strategy:
    name: str
    family: str | None  # prompt family; None for the baseline
    method: str  # generate | first_token | label_likelihood | tfidf

    @property
    def prompt_format(self) -> str | None:
        """Which kind of model the strategy is for: a chat model, or a plain-prompt one."""
        if self.family is None:
            return None
        return "plain" if self.family == "finetuned" else "chat"


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("zero_shot_generate", "zero_shot", "generate"),
        Strategy("zero_shot_first_token", "zero_shot", "first_token"),
        Strategy("few_shot_generate", "few_shot", "generate"),
        Strategy("few_shot_first_token", "few_shot", "first_token"),
        Strategy("finetuned_first_token", "finetuned", "first_token"),
        Strategy("zero_shot_label_likelihood", "zero_shot", "label_likelihood"),
        Strategy("few_shot_label_likelihood", "few_shot", "label_likelihood"),
        Strategy("finetuned_label_likelihood", "finetuned", "label_likelihood"),
        Strategy("baseline_tfidf", None, "tfidf"),
    )
}
BASELINE_MODEL = "baseline"


def strategies_for(prompt_format: str, names: Sequence[str]) -> list[str]:
    """The strategies among ``names`` that apply to a model with this prompt format."""
    return [n for n in names if STRATEGIES[n].prompt_format == prompt_format]


@dataclass
class Settings:
    """How a strategy runs (from config): decoding, scoring and answer parsing."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    fallback_label: str = "Otras"
    length_normalize: bool = False
    calibrate: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    predictions: pd.DataFrame
    metadata: dict[str, Any]


def score_columns(labels: Sequence[str] = LABELS) -> list[str]:
    return [f"p_{label}" for label in labels]


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("emoprompt", "torch", "transformers", "scikit-learn", "numpy", "pandas"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def build_prompts(
    strategy: Strategy,
    prompt: PromptFile,
    tokenizer: Any,
    train: pd.DataFrame,
    sample: pd.DataFrame,
    template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[PromptParts], dict[str, Any]]:
    """Every tweet's prompt, and a record of what was asked (messages, shots, digest)."""
    if strategy.family == "finetuned":
        parts = [render_plain(prompt, tweet) for tweet in sample["tweet"]]
        template = prompt.settings["template"]
        return parts, {"template": template, "prompt_sha256": prompt_sha256(template)}
    shots_of: dict[str, list[tuple[str, str]]] = {}
    record: dict[str, Any] = {}
    if strategy.family == "few_shot":
        from emoprompt.prompting.fewshot import select_shots  # only few-shot strategies need it

        settings = prompt.settings
        plan = select_shots(
            train,
            sample,
            method=settings["selection"],
            n=settings["shots"],
            seed=settings.get("seed", 0),
            manual_ids=settings.get("manual_ids", ()),
        )
        by_id = train.set_index("id")
        for test_id in sample["id"]:
            ids = plan.ids_for(test_id)
            shots_of[test_id] = [(by_id.at[i, "tweet"], by_id.at[i, "label"]) for i in ids]
        record["few_shot"] = {
            "method": settings["selection"],
            "n": settings["shots"],
            "seed": settings.get("seed", 0),
            "ids": plan.shared,
            "per_tweet_ids": plan.per_tweet,
        }
    parts = []
    for test_id, tweet in zip(sample["id"], sample["tweet"], strict=True):
        messages = chat_messages(prompt, tweet, shots_of.get(test_id, ()))
        parts.append(render_chat(tokenizer, messages, template_kwargs))
    first_id = sample["id"].iloc[0]
    example = chat_messages(prompt, "{tweet}", shots_of.get(first_id, ()))
    record.update(messages=example, prompt_sha256=prompt_sha256(example))
    return parts, record


def _calibration(engine: Any, prompts_cf: list[PromptParts], labels, settings: Settings):
    logprobs = engine.label_logprobs(prompts_cf, labels, normalize=settings.length_normalize)
    return _softmax(logprobs).mean(axis=0)


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = values - values.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def to_seven(probs: np.ndarray, labels: Sequence[str], label_map: Mapping[str, str]) -> np.ndarray:
    """Map probabilities over a prompt's own labels onto the seven classes (summing)."""
    out = np.zeros((probs.shape[0], len(LABELS)))
    for j, label in enumerate(labels):
        out[:, LABELS.index(label_map[label])] += probs[:, j]
    return out


def run_llm_strategy(
    strategy: Strategy,
    engine: Any,
    tokenizer: Any,
    prompt: PromptFile,
    train: pd.DataFrame,
    sample: pd.DataFrame,
    settings: Settings,
) -> Result:
    """Run one prompting strategy over the sample with an engine; return predictions."""
    labels, label_map = prompt.labels, prompt.label_map
    parts, record = build_prompts(
        strategy, prompt, tokenizer, train, sample, settings.chat_template_kwargs
    )
    start = time.perf_counter()
    raw: list[str] = [""] * len(parts)
    parsed = [True] * len(parts)
    probs7 = np.full((len(parts), len(LABELS)), np.nan)
    if strategy.method == "generate":
        generations = engine.generate(
            parts,
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            temperature=settings.temperature,
            seed=settings.seed,
        )
        raw = [g.text for g in generations]
        answers = [parse_label(text, labels, fallback=None) for text in raw]
        parsed = [a.parsed for a in answers]
        predicted = [label_map[a.label] if a.parsed else settings.fallback_label for a in answers]
    else:
        if strategy.method == "first_token":
            probs = engine.first_token_probs(parts, labels)
            record["label_first_tokens"] = engine.label_first_tokens(labels, parts[0].text)
        else:
            logprobs = engine.label_logprobs(parts, labels, normalize=settings.length_normalize)
            probs = _softmax(logprobs)
            if settings.calibrate:
                content_free = [
                    _content_free_prompt(strategy, prompt, tokenizer, train, sample, text, settings)
                    for text in CONTENT_FREE
                ]
                prior = _calibration(engine, content_free, labels, settings)
                probs = probs / prior
                probs = probs / probs.sum(axis=1, keepdims=True)
                record["calibration_prior"] = dict(
                    zip(labels, prior.round(6).tolist(), strict=True)
                )
        probs7 = to_seven(probs, labels, label_map)
        predicted = [LABELS[i] for i in probs7.argmax(axis=1)]
    seconds = time.perf_counter() - start

    frame = pd.DataFrame(
        {
            "id": sample["id"].tolist(),
            "gold": sample["label"].tolist(),
            "predicted": predicted,
            "parsed": parsed,
            "raw": raw,
        }
    )
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
        "decoding": {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "temperature": settings.temperature,
            "seed": settings.seed,
        }
        if strategy.method == "generate"
        else None,
        "scoring": {
            "length_normalize": settings.length_normalize,
            "calibrate": settings.calibrate,
        }
        if strategy.method == "label_likelihood"
        else None,
        "fallback_label": settings.fallback_label,
        "unparsed": int(len(parsed) - sum(parsed)),
        "tweets": len(frame),
        "seconds": round(seconds, 3),
        "tweets_per_s": round(len(frame) / seconds, 4) if seconds > 0 else None,
        "tokens_in": int(engine.stats.get("tokens_in", 0)),
        "tokens_out": int(engine.stats.get("tokens_out", 0)),
        "versions": library_versions(),
    }
    return Result(frame, metadata)


def _content_free_prompt(strategy, prompt, tokenizer, train, sample, text, settings):
    """The strategy's prompt with a content-free tweet (same shots as the first tweet)."""
    stand_in = sample.iloc[:1].assign(tweet=text)
    parts, _ = build_prompts(
        strategy, prompt, tokenizer, train, stand_in, settings.chat_template_kwargs
    )
    return parts[0]


def run_baseline(train: pd.DataFrame, sample: pd.DataFrame, seed: int = 0) -> Result:
    """The TF-IDF + logistic regression anchor, with the same output files as the LLMs."""
    from emoprompt.evaluation.baseline import predict_proba_frame, train_tfidf_baseline

    start = time.perf_counter()
    pipeline = train_tfidf_baseline(train, seed=seed)
    scores = predict_proba_frame(pipeline, sample)
    seconds = time.perf_counter() - start
    frame = pd.DataFrame(
        {
            "id": sample["id"].tolist(),
            "gold": sample["label"].tolist(),
            "predicted": scores["predicted"].tolist(),
            "parsed": True,
            "raw": "",
        }
    )
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
        "tweets": len(frame),
        "seconds": round(seconds, 3),
        "tweets_per_s": round(len(frame) / seconds, 4) if seconds > 0 else None,
        "versions": library_versions(),
    }
    return Result(frame, metadata)


def write_result(result: Result, tsv_path: str, json_path: str) -> None:
    """Write the per-tweet predictions (TSV) and the run's metadata (JSON), atomically."""
    with atomic_open(tsv_path, newline="") as handle:
        result.predictions.to_csv(
            handle, sep="\t", index=False, lineterminator="\n", float_format="%.6g"
        )
    write_json(json_path, result.metadata)


def read_predictions(path: str) -> pd.DataFrame:
    """Read a predictions TSV written by :func:`write_result`."""
    frame = pd.read_csv(
        path,
        sep="\t",
        dtype={"id": str, "raw": str},
        keep_default_na=False,
        na_values={c: [""] for c in score_columns()},
    )
    frame["parsed"] = frame["parsed"].astype(str).str.lower() == "true"
    return frame
