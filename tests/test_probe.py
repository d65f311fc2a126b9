"""The linear probe: hidden-state features, the choice on validation, the strategy's output.

Features are checked against transformers' own ``output_hidden_states`` of a plain
one-text forward, on the tiny random Llama with Meta's real Llama 3 tokenizer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from emoprompt.evaluation.probe import ProbeSettings, choose, run_probe
from emoprompt.inference.hidden import check_layers, layer_features
from emoprompt.labels import LABELS

TEXTS = [
    "hola",
    "Qué día tan triste, no puedo creer lo que pasó en Notre Dame #NotreDame",
    "¡Golazo! 😍😍 https://t.co/abc",
    "me da miedo salir",
    "vaya asco de final",
]


def _reference(model, tokenizer, text: str) -> tuple[torch.Tensor, ...]:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_features_equal_transformers_hidden_states_of_each_text_alone(tiny_llama, batch_size):
    model, tokenizer = tiny_llama
    depth = model.config.num_hidden_layers
    layers = list(range(1, depth + 1))
    features = layer_features(model, tokenizer, TEXTS, layers, batch_size=batch_size)
    for i, text in enumerate(TEXTS):
        states = _reference(model, tokenizer, text)
        for layer in layers:  # the last layer's state is after the final norm, as there
            mean = states[layer][0].mean(dim=0).numpy()
            last = states[layer][0, -1].numpy()
            assert np.abs(features[(layer, "mean")][i] - mean).max() < 1e-5
            assert np.abs(features[(layer, "last")][i] - last).max() < 1e-5


def test_layers_are_checked_and_count_from_the_top():
    assert check_layers([1, -1, 20], 30) == [1, 30, 20]
    with pytest.raises(ValueError, match=r"outside the model's 1\.\.30"):
        check_layers([31], 30)
    with pytest.raises(ValueError, match="outside"):
        check_layers([0], 30)


def test_settings_refuse_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown setting"):
        ProbeSettings.from_mapping({"layer": 3})
    with pytest.raises(ValueError, match="pooling"):
        ProbeSettings.from_mapping({"pooling": ["max"]})
    with pytest.raises(ValueError, match="positive"):
        ProbeSettings.from_mapping({"C": [0.0]})
    assert ProbeSettings.from_mapping({"layers": 3}).layers == (3,)


def _blobs(n: int, informative: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Features where only the first ``informative`` columns carry the class."""
    rng = np.random.default_rng(seed)
    y = [LABELS[i % len(LABELS)] for i in range(n)]
    x = rng.normal(size=(n, 12))
    for r, label in enumerate(y):
        x[r, :informative] += 3.0 * (LABELS.index(label) + 1) / len(LABELS)
    return x, y


def test_the_choice_is_made_on_validation_alone():
    # layer 2 carries the class, layer 1 does not: validation must pick layer 2
    tx_good, ty = _blobs(140, 12, seed=0)
    vx_good, vy = _blobs(70, 12, seed=1)
    rng = np.random.default_rng(2)
    train_x = {(1, "mean"): rng.normal(size=(140, 12)), (2, "mean"): tx_good}
    valid_x = {(1, "mean"): rng.normal(size=(70, 12)), (2, "mean"): vx_good}
    settings = ProbeSettings(layers=(1, 2), pooling=("mean",), C=(0.1, 1.0))
    chosen, _model, candidates = choose(train_x, ty, valid_x, vy, settings)
    assert chosen["layer"] == 2 and len(candidates) == 4
    assert chosen["validation_macro_f1"] == max(c["validation_macro_f1"] for c in candidates)
    assert chosen["validation_macro_f1"] > 0.5
    by_layer = {c["layer"]: c["validation_macro_f1"] for c in candidates if c["C"] == 1.0}
    assert by_layer[1] < 0.4  # chance is 1/7


def test_probe_strategy_writes_seven_probabilities_and_its_validation_score(tiny_llama):
    model, tokenizer = tiny_llama
    rng = np.random.default_rng(0)

    def split(n: int, prefix: str) -> pd.DataFrame:
        labels = [LABELS[i % len(LABELS)] for i in range(n)]
        words = {label: label.lower() for label in LABELS}  # the label's word in the text
        return pd.DataFrame({
            "id": [f"{prefix}{i}" for i in range(n)],
            "tweet": [f"{words[lab]} {rng.integers(100)}" for lab in labels],
            "label": labels,
        })

    train, validation, sample = split(70, "t"), split(35, "v"), split(14, "s")
    settings = ProbeSettings(layers=(1, 2), pooling=("mean", "last"), C=(0.1, 1.0))
    result = run_probe(model, tokenizer, train, validation, sample, settings)
    frame = result.predictions
    probs = frame[[f"p_{label}" for label in LABELS]].to_numpy()
    assert probs.shape == (14, 7) and np.allclose(probs.sum(axis=1), 1.0)
    assert (frame["predicted"] == [LABELS[i] for i in probs.argmax(axis=1)]).all()
    assert frame["id"].tolist() == sample["id"].tolist()
    meta = result.metadata
    assert meta["method"] == "probe" and len(meta["probe"]["candidates"]) == 8
    chosen = meta["probe"]["chosen"]
    assert meta["validation"]["tweets"] == 35
    assert meta["validation"]["f1_macro"]["value"] == pytest.approx(
        chosen["validation_macro_f1"], abs=1e-4
    )
    low, high = meta["validation"]["f1_macro"]["low"], meta["validation"]["f1_macro"]["high"]
    assert low <= chosen["validation_macro_f1"] <= high
    # the words name the classes, so even a random model's states separate them
    assert chosen["validation_macro_f1"] > 0.5
