"""Each strategy end to end on a model: well-formed predictions and metadata."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from emoprompt.data.prepare import Prepared, prepare
from emoprompt.data.splits import read_split
from emoprompt.evaluation.predictions import read_predictions, score_columns, write_result
from emoprompt.evaluation.runner import run_llm_strategy
from emoprompt.evaluation.strategies import STRATEGIES, Settings
from emoprompt.inference.engine import Engine
from emoprompt.labels import LABELS
from emoprompt.prompting.prompt_file import load_prompt_file

CHAT = [n for n, s in STRATEGIES.items() if s.prompt_format == "chat" and s.family]
PLAIN = [n for n, s in STRATEGIES.items() if s.prompt_format == "plain"]


@pytest.fixture(scope="module")
def splits(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("splits")
    prepare(data_dir / "emoeval_data.zip", Prepared.in_folder(out))
    train, test = read_split(out / "train.tsv"), read_split(out / "test.tsv")
    return train, test.iloc[:4].reset_index(drop=True)


def prompt_for(name: str):
    family = STRATEGIES[name].family
    return load_prompt_file(REPO / "prompts" / f"{family}.yaml", family)


def check_result(result, sample: pd.DataFrame, name: str, labels) -> None:
    frame = result.predictions
    assert frame["id"].tolist() == sample["id"].tolist()
    assert frame["gold"].tolist() == sample["label"].tolist()
    assert set(frame["predicted"]) <= set(LABELS)
    probs = frame[score_columns()].to_numpy()
    meta = result.metadata
    assert meta["strategy"] == name and meta["tweets"] == len(sample)
    assert len(meta["prompt_sha256"]) == 64
    if STRATEGIES[name].method == "generate":
        assert np.isnan(probs).all()
        assert frame["raw"].map(len).gt(0).any()
        assert meta["unparsed"] == int((~frame["parsed"]).sum())
    else:
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
        assert (probs >= 0).all()
        assert frame["predicted"].tolist() == [LABELS[i] for i in probs.argmax(axis=1)]
        assert frame["parsed"].all()
    if STRATEGIES[name].family == "few_shot":
        ids = meta["few_shot"]["ids"]
        assert len(ids) == meta["few_shot"]["n"] and not set(ids) & set(sample["id"])
    if "Neutral" in labels:  # the fine-tuned label set has no Desagrado
        assert (frame["p_Desagrado"].fillna(0) == 0).all()


@pytest.mark.parametrize("name", CHAT + PLAIN)
def test_every_strategy_on_the_tiny_llama(name, tiny_llama, splits, tmp_path):
    model, tokenizer = tiny_llama
    train, sample = splits
    prompt = prompt_for(name)
    engine = Engine(model, tokenizer, batch_size=3, progress=False)
    settings = Settings(max_new_tokens=5, calibrate=True, length_normalize=True)
    result = run_llm_strategy(STRATEGIES[name], engine, tokenizer, prompt, train, sample, settings)
    check_result(result, sample, name, prompt.labels)
    write_result(result, tmp_path / "p.tsv", tmp_path / "p.json")
    back = read_predictions(tmp_path / "p.tsv")
    assert back["id"].tolist() == result.predictions["id"].tolist()
    assert back["parsed"].tolist() == result.predictions["parsed"].tolist()
    assert json.loads((tmp_path / "p.json").read_text())["strategy"] == name


@pytest.mark.slow
def test_every_scoring_method_on_real_tweets_with_smollm2(smollm2, splits):
    model, tokenizer = smollm2
    train, sample = splits
    engine = Engine(model, tokenizer, batch_size=4, progress=False)
    for name in CHAT:
        prompt = prompt_for(name)
        if "shots" in prompt.settings:  # fewer shots than the default: a quicker test
            prompt = replace(prompt, settings={**prompt.settings, "shots": 3})
        settings = Settings(max_new_tokens=8)
        result = run_llm_strategy(
            STRATEGIES[name], engine, tokenizer, prompt, train, sample.iloc[:2], settings
        )
        check_result(result, sample.iloc[:2], name, prompt.labels)
