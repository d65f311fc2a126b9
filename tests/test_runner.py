"""The strategies' arithmetic over a fake backend (no model): what the runner does with
the scores and answers a backend gives - calibration, the mapping onto the seven classes,
answer parsing and its fallback, and the record of the backend used."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from emoprompt.evaluation.runner import run_llm_strategy
from emoprompt.evaluation.strategies import STRATEGIES, Settings
from emoprompt.inference.backend import Backend, Generation, new_stats
from emoprompt.labels import LABELS
from emoprompt.prompting.prompt_file import load_prompt_file


class FakeBackend(Backend):
    """Scores from the prompt text alone: a label named in the tweet gets log-likelihood
    0 and the others -3; a content-free prompt ("N/A") favours Otras. Answers name the
    label the tweet names, or none."""

    def __init__(self) -> None:
        self.stats = new_stats()
        self.calls: list[str] = []

    def describe(self):
        return {"backend": "fake", "device": "none", "dtype": "none", "speedups": []}

    def _scores(self, text: str, labels: Sequence[str]) -> np.ndarray:
        tweet = text.rsplit("N/A", 1)[0] if "N/A" in text else text
        scores = np.full(len(labels), -3.0)
        for j, label in enumerate(labels):
            if f"pura {label}" in tweet:
                scores[j] = 0.0
        if "N/A" in text and "Otras" in labels:
            scores[list(labels).index("Otras")] = -1.0
        return scores

    def label_first_tokens(self, labels, context):
        return list(range(len(labels)))

    def first_token_probs(self, prompts, labels):
        self.calls.append("first_token")
        scores = np.array([self._scores(p.text, labels) for p in prompts])
        exp = np.exp(scores)
        return exp / exp.sum(axis=1, keepdims=True)

    def label_logprobs(self, prompts, labels, *, end_token=None, normalize=False):
        self.calls.append(f"label_logprobs(normalize={normalize})")
        return np.array([self._scores(p.text, labels) for p in prompts])

    def generate(self, prompts, **decoding):
        self.calls.append("generate")
        out = []
        for p in prompts:
            named = [label for label in LABELS if f"pura {label}" in p.text]
            out.append(Generation(f"Es {named[-1]}." if named else "No lo sé.", 10, 3))
        return out


@pytest.fixture(scope="module")
def splits():
    tweets = ["Esto es pura Ira", "Qué pura Alegría", "Nada que decir", "pura Miedo, socorro"]
    gold = ["Ira", "Alegría", "Otras", "Miedo"]
    sample = pd.DataFrame(
        {"id": [f"t{i}" for i in range(4)], "event": "X", "tweet": tweets, "label": gold}
    )
    train = pd.DataFrame(
        {
            "id": [f"s{i}" for i in range(14)],
            "event": "X",
            "tweet": [f"un tuit de {label}" for label in LABELS * 2],
            "label": LABELS * 2,
        }
    )
    return train, sample


def run(name, tokenizer, splits, **settings):
    train, sample = splits
    family = STRATEGIES[name].family
    prompt = load_prompt_file(REPO / "prompts" / f"{family}.yaml", family)
    backend = FakeBackend()
    result = run_llm_strategy(
        STRATEGIES[name], backend, tokenizer, prompt, train, sample, Settings(**settings)
    )
    return result, backend


def test_first_token_scores_become_predictions_and_the_backend_is_recorded(
    llama3_tokenizer, splits
):
    result, backend = run("zero_shot_first_token", llama3_tokenizer, splits)
    frame = result.predictions
    # "Nada que decir" names no label: all seven tie and the first (Alegría) is taken
    assert frame["predicted"].tolist() == ["Ira", "Alegría", "Alegría", "Miedo"]
    assert np.allclose(frame[[f"p_{label}" for label in LABELS]].sum(axis=1), 1.0)
    assert result.metadata["backend"]["backend"] == "fake"
    assert backend.calls == ["first_token"]


def test_calibration_divides_by_the_content_free_prior(llama3_tokenizer, splits):
    plain, _ = run("zero_shot_label_likelihood", llama3_tokenizer, splits)
    calibrated, backend = run(
        "zero_shot_label_likelihood", llama3_tokenizer, splits, calibrate=True
    )
    assert backend.calls == ["label_logprobs(normalize=False)"] * 2
    prior = np.array([calibrated.metadata["calibration_prior"][label] for label in LABELS])
    # the prior is the mean softmax of the content-free prompts: Otras is favoured
    assert prior.argmax() == LABELS.index("Otras") and prior.sum() == pytest.approx(1, abs=1e-5)
    columns = [f"p_{label}" for label in LABELS]
    expected = plain.predictions[columns].to_numpy() / prior
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(calibrated.predictions[columns].to_numpy(), expected, atol=1e-5)
    assert not np.allclose(expected, plain.predictions[columns].to_numpy())


def test_length_normalisation_is_asked_of_the_backend(llama3_tokenizer, splits):
    _, backend = run("zero_shot_label_likelihood", llama3_tokenizer, splits, length_normalize=True)
    assert backend.calls == ["label_logprobs(normalize=True)"]


def test_answers_are_parsed_and_unparsed_ones_get_the_fallback(llama3_tokenizer, splits):
    result, _ = run("zero_shot_generate", llama3_tokenizer, splits, fallback_label="Otras")
    frame = result.predictions
    assert frame["predicted"].tolist() == ["Ira", "Alegría", "Otras", "Miedo"]
    assert frame["parsed"].tolist() == [True, True, False, True]
    assert result.metadata["unparsed"] == 1
    assert frame["raw"].iloc[2] == "No lo sé."


def test_a_label_set_of_its_own_is_mapped_onto_the_seven_classes(llama3_tokenizer, splits):
    train, sample = splits
    prompt = load_prompt_file(REPO / "prompts" / "finetuned.yaml", "finetuned")
    sample = sample.assign(tweet=["pura Neutral", "pura Ira", "x", "y"])
    result = run_llm_strategy(
        STRATEGIES["finetuned_first_token"],
        FakeBackend(),
        llama3_tokenizer,
        prompt,
        train,
        sample,
        Settings(),
    )
    frame = result.predictions
    assert frame["predicted"].iloc[0] == "Otras" and frame["predicted"].iloc[1] == "Ira"
    assert (frame["p_Desagrado"] == 0).all()  # the model's label set has no Desagrado
