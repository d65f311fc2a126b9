"""Fine-tuning: training data, loss mask, and a killed training that resumes.

Runs on the tiny random Llama (Meta's real Llama 3 tokenizer) and on SmolLM2's real
tokenizer, on CPU, in well under a minute.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from emoprompt.data.splits import read_split, write_split
from emoprompt.evaluation.prompts import build_prompts
from emoprompt.evaluation.runner import run_llm_strategy
from emoprompt.evaluation.strategies import STRATEGIES, Settings
from emoprompt.inference.engine import Engine
from emoprompt.inference.hidden import decoder_of
from emoprompt.inference.planning import BatchPlanner
from emoprompt.inference.tokens import TokenizerRules
from emoprompt.labels import LABELS
from emoprompt.models.adapter import TRAIN_IDS_FILE, TRAINING_CONFIG, adapter_prompt
from emoprompt.models.loading import load_model
from emoprompt.prompting.prompt_file import load_prompt_file
from emoprompt.prompting.render import render_plain
from emoprompt.training.checkpoints import checkpoint_steps
from emoprompt.training.dataset import (
    IGNORE,
    PromptSpec,
    answer_first_tokens,
    answer_for_class,
    build_examples,
    class_weights,
    collate,
    label_scheme,
    plan_batches,
    select_training_set,
)
from emoprompt.training.frozen import frozen_plan, frozen_states, padded, top_layers
from emoprompt.training.loop import answer_loss, first_answer_tokens
from emoprompt.training.lora import lora_model
from emoprompt.training.settings import FinetuneSettings

FINETUNED_PROMPT = REPO / "prompts" / "finetuned.yaml"
ZERO_SHOT_PROMPT = REPO / "prompts" / "zero_shot.yaml"
CPU = {"dtype": "float32", "quantization": "none", "allow_fallback": False}


def synthetic_split(n: int = 140, seed: int = 0) -> pd.DataFrame:
    """A split with the real data's imbalance (many Otras, few Miedo) and short tweets."""
    rng = np.random.default_rng(seed)
    shares = [0.2, 0.12, 0.03, 0.1, 0.03, 0.05, 0.47]
    labels = rng.choice(LABELS, size=n, p=shares)
    words = ["hoy", "qué", "día", "gol", "miedo", "asco", "vaya", "final", "lluvia", "#Notre"]
    return pd.DataFrame({
        "id": [f"t{i:04d}" for i in range(n)],
        "event": "X",
        "tweet": [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(n)],
        "offensive": "NO",
        "label": labels,
    })


# ------------------------------------------------------------------ the training data
def test_training_set_never_holds_an_evaluation_id_and_is_stratified_and_seeded():
    train = synthetic_split(400)
    sample_ids = train["id"].iloc[::7].tolist()  # as if the sample overlapped the split
    chosen = select_training_set(train, exclude_ids=sample_ids, size=120, seed=3)
    assert len(chosen) == 120
    assert not set(chosen["id"]) & set(sample_ids)
    pool = train[~train["id"].isin(sample_ids)]
    expected = pool["label"].value_counts(normalize=True) * 120
    got = chosen["label"].value_counts().reindex(expected.index, fill_value=0)
    assert (abs(got - expected) < 1).all()  # proportional, to the tweet
    again = select_training_set(train, exclude_ids=sample_ids, size=120, seed=3)
    assert chosen["id"].tolist() == again["id"].tolist()
    other = select_training_set(train, exclude_ids=sample_ids, size=120, seed=4)
    assert chosen["id"].tolist() != other["id"].tolist()
    whole = select_training_set(train, exclude_ids=sample_ids)
    assert len(whole) == len(pool) and not set(whole["id"]) & set(sample_ids)


def test_balanced_subset_takes_small_classes_whole_and_shares_the_rest():
    train = synthetic_split(400)
    counts = train["label"].value_counts()
    chosen = select_training_set(train, size=140, subset="balanced", seed=0)
    got = chosen["label"].value_counts()
    assert len(chosen) == 140
    partial = [label for label in counts.index if got[label] < counts[label]]
    assert partial  # 140 cannot take everything: the big classes are capped ...
    assert max(got[p] for p in partial) - min(got[p] for p in partial) <= 1  # ... evenly
    for label in set(counts.index) - set(partial):  # ... and the small ones come whole
        assert got[label] == counts[label] <= min(got[p] for p in partial)


def test_class_weights_average_one_and_favour_rare_classes():
    labels = ["Otras"] * 80 + ["Miedo"] * 5 + ["Ira"] * 15
    for scheme in ("sqrt", "balanced"):
        weights = class_weights(labels, scheme)
        assert np.isclose(np.mean([weights[c] for c in labels]), 1.0)
        assert weights["Miedo"] > weights["Ira"] > weights["Otras"]
    assert set(class_weights(labels, "none").values()) == {1.0}


def test_notebook_label_set_trains_neutral_for_otras_and_skips_desagrado():
    labels, label_map = label_scheme("notebook", load_prompt_file(FINETUNED_PROMPT, "finetuned"))
    answers = answer_for_class(labels, label_map)
    assert answers["Otras"] == "Neutral" and "Desagrado" not in answers
    chosen = select_training_set(synthetic_split(), classes=list(answers))
    assert "Desagrado" not in set(chosen["label"])


# ------------------------------------------------------------------ the loss mask
@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_loss_mask_covers_exactly_the_answer_and_end_token(fmt, llama3_tokenizer, smollm2):
    for tokenizer in (llama3_tokenizer, smollm2[1]):
        if fmt == "plain":
            spec = PromptSpec("plain", load_prompt_file(FINETUNED_PROMPT, "finetuned"))
        else:
            spec = PromptSpec("chat", load_prompt_file(ZERO_SHOT_PROMPT, "zero_shot"))
        frame = synthetic_split(30)
        answers = {label: label for label in LABELS}
        examples = build_examples(frame, tokenizer, spec, answers, max_length=512)
        for example, row in zip(examples, frame.itertuples(), strict=True):
            masked = [i for i, t in enumerate(example.labels) if t != IGNORE]
            n = len(masked)
            # the answer is the last n tokens, contiguous, and the loss sees nothing else
            assert masked == list(range(len(example.input_ids) - n, len(example.input_ids)))
            assert example.labels[-n:] == example.input_ids[-n:]
            prompt = spec.text(tokenizer, row.tweet)
            answer_text = tokenizer.decode(example.input_ids[-n:-1])
            assert answer_text == row.label
            end = tokenizer.convert_ids_to_tokens(example.input_ids[-1])
            assert end in ("<|eot_id|>", "<|im_end|>")
            # the prompt part is the prompt exactly as the engine would encode it
            head = tokenizer.decode(example.input_ids[: len(example.input_ids) - n],
                                    skip_special_tokens=False)
            assert head.endswith(prompt) or head == prompt
        batch = collate(examples[:4], tokenizer.pad_token_id)
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_label_loss_is_a_softmax_over_the_answers_first_tokens(tiny_llama, smollm2):
    model, tokenizer = tiny_llama
    spec = PromptSpec("plain", load_prompt_file(FINETUNED_PROMPT, "finetuned"))
    frame = synthetic_split(40, seed=3)
    answers = {label: label for label in LABELS}
    examples = build_examples(frame, tokenizer, spec, answers, max_length=96)[:6]
    first_of = answer_first_tokens(tokenizer, spec, LABELS)
    candidates = first_answer_tokens(examples, LABELS, first_of)
    # the candidates are the tokens finetuned_first_token scores
    parts = render_plain(load_prompt_file(FINETUNED_PROMPT, "finetuned"), frame.tweet[0])
    engine = Engine(model, tokenizer, progress=False)
    assert candidates.tolist() == engine.label_first_tokens(LABELS, parts.prefix + parts.suffix)
    batch = collate(examples, tokenizer.pad_token_id)
    weights = torch.linspace(0.5, 2.0, len(examples))
    with torch.no_grad():
        got = answer_loss(model, batch, weights, candidates)
        expected = []
        for e in examples:  # one unpadded forward per tweet, the full logits, then select
            prompt_len = e.labels.index(next(t for t in e.labels if t != IGNORE))
            logits = model(input_ids=torch.tensor([e.input_ids[:prompt_len]])).logits[0, -1]
            target = candidates.tolist().index(e.input_ids[prompt_len])
            expected.append(torch.nn.functional.cross_entropy(logits[candidates][None],
                                                              torch.tensor([target])))
        expected = (torch.stack(expected) * weights).sum() / weights.sum()
    assert torch.allclose(got, expected, atol=1e-5)
    wrong = {**first_of, examples[0].answer: first_of[examples[0].answer] + 1}
    with pytest.raises(ValueError, match=f"tweet {examples[0].id}"):
        first_answer_tokens(examples, LABELS, wrong)
    # answers that share their first token cannot be told apart by it
    with pytest.raises(ValueError, match="same token"):
        first_answer_tokens([], ["Ira", "Miedo"], {"Ira": 7, "Miedo": 7})


def _lora_step(model, tokenizer, layers: int, autocast: bool, frozen_batch: int | None):
    """One step's loss and LoRA gradients on 8 tweets: the whole model from the token ids,
    or (``frozen_batch``) the layers above the frozen ones from their states, computed
    beforehand in batches of that size."""
    torch.manual_seed(0)
    peft = lora_model(
        copy.deepcopy(model),
        FinetuneSettings(lora_layers=layers, lora_dropout=0.0, loss="labels"),
        quantized=False,
    )
    for p in peft.parameters():  # B starts at zero: give both factors a value
        if p.requires_grad:
            p.data = torch.randn_like(p) * 0.05
    spec = PromptSpec("plain", load_prompt_file(FINETUNED_PROMPT, "finetuned"))
    examples = build_examples(synthetic_split(40, seed=5), tokenizer, spec,
                              {label: label for label in LABELS}, max_length=64)[:8]
    candidates = first_answer_tokens(examples, LABELS, answer_first_tokens(tokenizer, spec,
                                                                           LABELS))
    batch = collate(examples, tokenizer.pad_token_id)
    weights = torch.linspace(0.5, 2.0, len(examples))
    embeds, decoder = None, contextlib.nullcontext()
    if frozen_batch:
        depth, why = frozen_plan(peft, "auto", "cpu", "none", False)
        assert depth == len(decoder_of(peft)[0]) - layers, why
        states = frozen_states(peft, examples, tokenizer.pad_token_id, depth,
                               autocast=autocast, batch_size=frozen_batch)
        embeds, decoder = padded(states), top_layers(peft, depth)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), decoder:
        loss = answer_loss(peft, batch, weights, candidates, embeds)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    assert len(decoder_of(peft)[0]) == peft.config.num_hidden_layers  # put back whole
    return loss.item(), grads


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("arch", ["tiny_llama", "smollm2"])
def test_frozen_states_give_the_plain_steps_loss_and_gradients(arch, autocast, request):
    """The speed-up on each architecture and dtype it is enabled for (Llama; CPU): the
    bottom layers' output computed once, then the layers above from it, against the
    whole model from the token ids."""
    model, tokenizer = request.getfixturevalue(arch)
    layers = 1 if arch == "tiny_llama" else 10  # the default: SmolLM2's top 10 of 30
    plain_loss, plain = _lora_step(model, tokenizer, layers, autocast, None)
    # States computed in one batch of the step's 8 tweets: the very same numbers.
    loss, grads = _lora_step(model, tokenizer, layers, autocast, frozen_batch=8)
    assert plain.keys() == grads.keys() and len(grads) > 0
    assert loss == plain_loss
    assert all(torch.equal(grads[name], plain[name]) for name in plain)
    # In other batches (as in training: fixed batches before, shuffled ones in the
    # steps), the same sums over other shapes: float32 agrees to rounding; bfloat16
    # products round differently per shape, by about as much as the plain step moves
    # when only its padding grows (measured on SmolLM2: 9 more pad tokens change the
    # plain gradients by 2.1%, these by 5.5%).
    loss, grads = _lora_step(model, tokenizer, layers, autocast, frozen_batch=3)
    assert loss == pytest.approx(plain_loss, rel=5e-3 if autocast else 1e-5)
    for name, grad in grads.items():
        error = (grad - plain[name]).norm() / plain[name].norm()
        assert error < (0.1 if autocast else 1e-4), (name, float(error))


def test_frozen_states_are_on_only_where_proven(tiny_llama):
    model, _ = tiny_llama
    peft = lora_model(copy.deepcopy(model), FinetuneSettings(lora_layers=1), quantized=False)
    assert frozen_plan(peft, "auto", "cpu", "none", False) == (1, None)
    for args, why in (
        (("off", "cpu", "none", False), "turned off"),
        (("auto", "cuda", "none", False), "not proven on cuda"),
        (("auto", "cpu", "nf4", False), "nf4 quantization"),
        (("auto", "cpu", "none", True), "gradient checkpointing"),
    ):
        depth, reason = frozen_plan(peft, *args)
        assert depth == 0 and why in reason
    every = lora_model(copy.deepcopy(model), FinetuneSettings(lora_layers="all"), quantized=False)
    assert frozen_plan(every, "auto", "cpu", "none", False)[0] == 0
    other = copy.deepcopy(model)
    other.config.model_type = "gemma"  # scales its embeddings inside the decoder
    other = lora_model(other, FinetuneSettings(lora_layers=1), quantized=False)
    assert frozen_plan(other, "auto", "cpu", "none", False) == (0, "not proven for gemma models")


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_training_and_evaluation_tokenise_a_prompt_and_its_labels_identically(
    fmt, llama3_tokenizer, smollm2
):
    """The tokens fine-tuning trains on are those evaluation feeds and scores: the prompt
    as the engine's batch planner encodes it, then the label as the engine's label
    scoring tokenises it after that prompt, then the end of turn."""
    strategy = STRATEGIES["finetuned_first_token" if fmt == "plain" else "zero_shot_first_token"]
    path = FINETUNED_PROMPT if fmt == "plain" else ZERO_SHOT_PROMPT
    prompt = load_prompt_file(path, strategy.family)
    labels = list(prompt.labels)
    answers = answer_for_class(labels, prompt.label_map)  # fine-tuned: Neutral for Otras
    sample = synthetic_split(40, seed=5)
    sample = sample[sample["label"].isin(list(answers))].reset_index(drop=True)
    for tokenizer in (llama3_tokenizer, smollm2[1]):
        rules = TokenizerRules(tokenizer)
        examples = build_examples(sample, tokenizer, PromptSpec(fmt, prompt), answers, 512)
        parts, _ = build_prompts(strategy, prompt, tokenizer, sample.iloc[:0], sample)
        planner = BatchPlanner(
            rules=rules,
            stats=Counter(fallbacks=0),
            shares_prefix=lambda prefix, width: False,
            batch_size=16,
            max_batch_tokens=10**9,
            pass_cost_tokens=32,
        )
        fed = {}
        for group in planner.plan(parts):
            for item in group.items:
                fed[item.index] = group.prefix_ids + item.ids
        scored = rules.label_seqs([p.text for p in parts], labels)
        for i, (example, row) in enumerate(zip(examples, sample.itertuples(), strict=True)):
            n = sum(t != IGNORE for t in example.labels)
            assert example.input_ids[:-n] == fed[i]
            answer = scored[i][labels.index(answers[row.label])] + [rules.end_of_turn_id]
            assert example.input_ids[-n:] == answer
            bos = tokenizer.bos_token_id  # never doubled (chat templates write their own)
            assert example.input_ids[:2] != [bos, bos]


def test_long_tweets_are_shortened_but_their_answer_kept(smollm2):
    tokenizer = smollm2[1]
    spec = PromptSpec("plain", load_prompt_file(FINETUNED_PROMPT, "finetuned"))
    frame = synthetic_split(5).assign(tweet="palabra " * 200, label="Miedo")
    examples = build_examples(frame, tokenizer, spec, {"Miedo": "Miedo"}, max_length=48)
    for example in examples:
        assert example.truncated and len(example.input_ids) <= 48
        n = sum(t != IGNORE for t in example.labels)
        assert tokenizer.decode(example.input_ids[-n:-1]) == "Miedo"
        assert tokenizer.decode(example.input_ids[:-n]).endswith("### Emoción:\n")


def test_batch_plan_is_deterministic_and_covers_each_epoch():
    plan = plan_batches(10, 4, 2, seed=1)
    assert plan == plan_batches(10, 4, 2, seed=1)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert len([i for b in plan_batches(10, 4, 1.5, seed=1) for i in b]) == 15
    lengths = [int(x) for x in np.random.default_rng(0).integers(10, 100, size=64)]
    grouped = plan_batches(64, 4, 1, seed=1, lengths=lengths, group=16)
    assert sorted(i for b in grouped for i in b) == list(range(64))
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped])
    plain = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b)
                     for b in plan_batches(64, 4, 1, seed=1)])
    assert spread < plain / 3  # similar lengths together: little padding


# ------------------------------------------------------------------ kill and resume
def _job(tmp_path: Path, tiny_llama_dir: Path, out: str = "tiny-ft", **settings) -> Path:
    train = synthetic_split(160)
    validation, test = train.iloc[:12], train.iloc[12:20]  # as if they overlapped train
    write_split(train, tmp_path / "train.tsv")
    write_split(validation, tmp_path / "validation.tsv")
    write_split(test, tmp_path / "test.tsv")
    job = {
        "model_name": "tiny",
        "entry": {"source": "local", "path": str(tiny_llama_dir), "prompt_format": "chat",
                  "location": str(tiny_llama_dir)},
        "train_path": str(tmp_path / "train.tsv"),
        "held_out_paths": [str(tmp_path / "validation.tsv"), str(tmp_path / "test.tsv")],
        "validation_path": str(tmp_path / "validation.tsv"),
        "finetuned_prompt_path": str(FINETUNED_PROMPT),
        "zero_shot_prompt_path": str(ZERO_SHOT_PROMPT),
        "settings": {
            "train_size": "all", "epochs": 12, "batch_size": 4, "max_length": 48,
            "class_weights": "sqrt", "checkpoint_steps": 5, "learning_rate": 5e-3,
            "lora_layers": 1,  # the top one of two: the frozen bottom layer computed once
            **settings,
        },
        "out_dir": str(tmp_path / out),
        "figure_path": str(tmp_path / "figures" / "finetune_loss_tiny.png"),
        "threads": 1,
        "device": "cpu",
    }
    path = tmp_path / f"{out}.json"
    path.write_text(json.dumps(job), encoding="utf-8")
    return path


def _start(job: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "emoprompt.training.job", str(job), "--log", str(log)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path, tiny_llama_dir):
    job = _job(tmp_path, tiny_llama_dir)
    checkpoints = tmp_path / "tiny-ft.checkpoints"
    first = _start(job, tmp_path / "first.log")
    deadline = time.monotonic() + 60
    while not checkpoint_steps(checkpoints) and time.monotonic() < deadline:
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = checkpoint_steps(checkpoints)
    assert done, "no checkpoint appeared"
    assert not (tmp_path / "tiny-ft").exists()  # killed: no adapter, nothing half-written
    resumed_at = done[-1]
    total = 12 * 140 // 4  # 140 tweets (160 less the 20 held out), 12 epochs, batch 4
    assert resumed_at < total

    second = _start(job, tmp_path / "second.log")
    assert second.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()
    log = (tmp_path / "second.log").read_text()
    assert f"resumed from checkpoint step {resumed_at} of {total}" in log
    adapter = tmp_path / "tiny-ft"
    record = json.loads((adapter / TRAINING_CONFIG).read_text())
    assert record["steps"] == total and record["resumed_from_steps"] == [resumed_at]
    assert record["frozen_states"]["layers"] == 1  # on, and computed again on resuming
    loss = pd.read_csv(adapter / "loss.tsv", sep="\t")
    assert loss["step"].tolist() == list(range(1, total + 1))  # the history survived
    assert not checkpoints.exists()  # cleaned once the adapter is in place
    assert (tmp_path / "figures" / "finetune_loss_tiny.png").stat().st_size > 0
    held_out = {i for n in ("validation", "test") for i in read_split(tmp_path / f"{n}.tsv")["id"]}
    trained_ids = set((adapter / TRAIN_IDS_FILE).read_text().split())
    assert len(trained_ids) == 140 and not trained_ids & held_out
    assert record["held_out_tweets_left_out"] == 20
    # scored on validation as the evaluation loads it, with its interval
    validation = record["validation"]
    assert validation["tweets"] == 12 and validation["strategy"] == "finetuned_first_token"
    f1 = validation["f1_macro"]
    assert f1["low"] <= f1["value"] <= f1["high"]
    scored = pd.read_csv(adapter / "validation_predictions.tsv", sep="\t")
    assert scored["id"].tolist() == read_split(tmp_path / "validation.tsv")["id"].tolist()

    # the killed-and-resumed adapter is the one an uninterrupted training makes
    whole = _start(_job(tmp_path, tiny_llama_dir, out="whole-ft"), tmp_path / "whole.log")
    assert whole.wait(timeout=120) == 0, (tmp_path / "whole.log").read_text()
    resumed = load_file(str(adapter / "adapter_model.safetensors"))
    uninterrupted = load_file(str(tmp_path / "whole-ft" / "adapter_model.safetensors"))
    assert resumed.keys() == uninterrupted.keys() and resumed
    for name, tensor in resumed.items():
        assert torch.equal(tensor, uninterrupted[name]), name
    assert pd.read_csv(tmp_path / "whole-ft" / "loss.tsv", sep="\t")["loss"].tolist() == (
        loss["loss"].tolist()
    )

    # The adapter loads as a catalogue entry (source: finetuned) and scores.
    entry = {**CPU, "source": "finetuned", "base": "tiny", "adapter": str(adapter)}
    loaded = load_model(entry, str(tiny_llama_dir), device="cpu")
    assert loaded.info["adapter"]["path"] == str(adapter)
    prompt = adapter_prompt(load_prompt_file(FINETUNED_PROMPT, "finetuned"), adapter)
    assert prompt.labels == LABELS  # the adapter's seven, not the published model's six
    parts = [render_plain(prompt, t) for t in synthetic_split(6)["tweet"]]
    engine = Engine(loaded.model, loaded.tokenizer, batch_size=4, progress=False)
    probs = engine.first_token_probs(parts, prompt.labels)
    assert probs.shape == (6, 7) and np.allclose(probs.sum(axis=1), 1.0)
    # and the adapter changed the model: its scores differ from the base model's
    base = load_model(CPU, str(tiny_llama_dir), device="cpu")
    base_probs = Engine(base.model, base.tokenizer, progress=False).first_token_probs(
        parts, prompt.labels
    )
    assert not np.allclose(probs, base_probs, atol=1e-4)
    result = run_llm_strategy(
        STRATEGIES["finetuned_first_token"], engine, loaded.tokenizer, prompt,
        synthetic_split(10), synthetic_split(6), Settings(),
    )
    assert set(result.predictions["predicted"]) <= set(LABELS)


def test_settings_are_checked_and_other_settings_change_the_fingerprint(tmp_path, tiny_llama_dir):
    job = _job(tmp_path, tiny_llama_dir, epochs=1, checkpoint_steps=None)
    settings = FinetuneSettings.from_mapping(json.loads(job.read_text())["settings"])
    assert settings.fingerprint() != FinetuneSettings.from_mapping(
        {**json.loads(job.read_text())["settings"], "learning_rate": 1e-4}
    ).fingerprint()
    with pytest.raises(ValueError, match="unknown fine-tuning setting"):
        FinetuneSettings.from_mapping({"lora_rank": 8})


# ------------------------------------------------------------------ MLflow
def test_training_run_is_logged_once_and_linked_from_its_evaluation_runs(tmp_path):
    from mlflow.tracking import MlflowClient
    from test_tracking import make_run_files

    from emoprompt.tracking import TRAINING_RUN_TAG, resolve_tracking_uri, track_runs

    adapter = tmp_path / "smol-ft"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / TRAINING_CONFIG).write_text(json.dumps({
        "base_model": "smol", "prompt_format": "plain", "labels": list(LABELS),
        "train_tweets": 40, "seconds": 12.5, "steps": 5, "final_loss": 0.4,
        "settings": {"learning_rate": 0.001, "lora_r": 16, "checkpoint_minutes": 2},
        "versions": {"peft": "0.21.2"},
    }))
    pd.DataFrame({"step": range(1, 6), "loss": [2.0, 1.5, 1.0, 0.6, 0.4], "lr": 0.001,
                  "seconds": range(5)}).to_csv(adapter / "loss.tsv", sep="\t", index=False)
    results = tmp_path / "results"
    uri, artifacts = resolve_tracking_uri(results, environ={})
    runs = [make_run_files(results, "smol-ft", "finetuned_first_token", 0)]
    kwargs = {"experiment": "e", "tracking_uri": uri, "artifact_location": artifacts,
              "sample": {"size": 30, "scheme": "random", "seed": 0},
              "trainings": {"smol-ft": adapter}}
    training, evaluation = track_runs(runs, **kwargs)
    assert training.strategy == "finetune" and training.action == "created"
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(training.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5] and history[-1].value == 0.4
    run = client.get_run(training.run_id)
    assert run.data.params["ft_learning_rate"] == "0.001"
    assert run.data.params["base_model"] == "smol"
    names = {a.path for a in client.list_artifacts(training.run_id, "adapter")}
    assert {"adapter/training_config.json", "adapter/loss.tsv"} <= names
    assert client.get_run(evaluation.run_id).data.tags[TRAINING_RUN_TAG] == training.run_id
    again, _ = track_runs(runs, **kwargs)  # idempotent: the same run, not a new one
    assert again.run_id == training.run_id and again.action == "updated"


def test_a_short_training_in_process_writes_the_adapter_its_record_and_an_inspection(
    tmp_path, tiny_llama_dir
):
    """A few steps through train() itself (the fast tier's cover of the finetune job),
    then the fine-tuned model's inspection page, as rule inspect_model writes it."""
    from emoprompt.reporting.inspection import write_inspection
    from emoprompt.training.job import TrainingJob, train

    job = json.loads(_job(tmp_path, tiny_llama_dir, max_steps=3, epochs=1).read_text())
    train(TrainingJob(**job))
    adapter = tmp_path / "tiny-ft"
    record = json.loads((adapter / TRAINING_CONFIG).read_text())
    assert record["steps"] == 3 and record["validation"]["tweets"] == 12
    page = tmp_path / "inspect.md"
    entry = {**job["entry"], "source": "finetuned", "base": "tiny", "adapter": str(adapter),
             "prompt_format": "plain", "name": "tiny-ft"}  # fmt: skip
    write_inspection(model_name="tiny-ft", entry=entry, sample_path=str(tmp_path / "test.tsv"),
                     prompt_path=str(ZERO_SHOT_PROMPT), finetuned_prompt_path=str(FINETUNED_PROMPT),
                     out=str(page))  # fmt: skip
    text = page.read_text()
    assert "tiny-ft" in text and len(text.splitlines()) > 5


@pytest.mark.slow
def test_a_qlora_adapter_trains_on_the_nf4_model_on_a_cpu(tmp_path, llama3_tokenizer):
    """finetune quantization: nf4 on a CPU: QLoRA through bitsandbytes' CPU code on a
    64-wide tiny Llama; the adapter is scored on validation loaded on its NF4 base.
    (The default, quantization: auto, trains in full precision on a CPU.)"""
    from emoprompt.bench.conformance import ARCHITECTURES, NF4_WIDTHS, nf4_available, tiny_model
    from emoprompt.training.job import TrainingJob, _device_and_quantization, train

    if not nf4_available():
        pytest.skip("bitsandbytes cannot run NF4 here")
    folder = tmp_path / "tiny-64"
    tiny_model(ARCHITECTURES[0], llama3_tokenizer, "float32", widths=NF4_WIDTHS).save_pretrained(
        folder
    )
    llama3_tokenizer.save_pretrained(folder)
    job = json.loads(_job(tmp_path, folder, max_steps=3, epochs=1, quantization="nf4").read_text())
    job["entry"] = {**job["entry"], "dtype": "bfloat16", "quantization": "nf4"}
    train(TrainingJob(**job))
    record = json.loads((tmp_path / "tiny-ft" / TRAINING_CONFIG).read_text())
    assert record["quantization"] == "nf4" and record["steps"] == 3
    assert record["validation"]["tweets"] == 12
    auto = FinetuneSettings(quantization="auto")
    assert _device_and_quantization(auto, "cpu") == ("cpu", "none")
