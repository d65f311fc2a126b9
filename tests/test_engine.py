"""The inference engine, on real tokenizers and real (tiny random or small) models.

Every engine result is checked against a plain computation: one unpadded forward pass
per prompt (and per label), or ``model.generate`` on each prompt alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from emoprompt.inference.engine import Engine, Generation, LabelCollisionError, PromptParts
from emoprompt.labels import LABELS

SYSTEMS = [
    "Clasifica la emoción del tuit. Responde solo con una etiqueta: " + ", ".join(LABELS) + ".",
    "Eres un experto en emociones. ¿Qué siente quien escribe? Elige entre "
    + ", ".join(LABELS)
    + ". Responde con la etiqueta primero.",
]
TWEETS = [
    "ok",
    "Hoy es un gran día, ¡por fin ganamos la final! 😭🎉",
    "Qué asco de política, estoy harto de todo esto y de todos los que nos mienten cada día",
    "Tengo miedo",
]
ATOL = 1e-4


# ----------------------------------------------------------------------------- fixtures
def random_llama(tokenizer, **config) -> Any:
    """A seeded random 2-layer Llama for ``tokenizer``.

    Weights are drawn 10x wider than the default (std 0.2, not 0.02) so that outputs
    depend clearly on positions and context: with the default, a prompt fed at wrong
    positions changes label probabilities by less than the tests' 1e-4 tolerance.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**settings, **config})).eval()


@pytest.fixture(scope="module")
def tiny_llama3(llama3_tokenizer) -> tuple[Any, Any]:
    """Meta's Llama 3 tokenizer and chat template (BOS added by default, <|eot_id|>)."""
    model = random_llama(llama3_tokenizer, bos_token_id=128000, eos_token_id=[128001, 128009])
    model.generation_config.eos_token_id = [128001, 128008, 128009]  # as Llama 3.2 Instruct
    return model, llama3_tokenizer


@pytest.fixture(scope="module")
def tiny_chatml(smollm2_dir: Path) -> tuple[Any, Any]:
    """SmolLM2's real tokenizer and ChatML template (no BOS added, <|im_end|>)."""
    from transformers import AutoTokenizer

    from emoprompt.models.loading import prepare_tokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(smollm2_dir))
    model = random_llama(
        tokenizer, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return model, tokenizer


@pytest.fixture(params=["llama3", "chatml"])
def tiny(request) -> tuple[Any, Any]:
    """Both tiny models in turn."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(params=["shared", "per-row"])
def prefix_layout(request, monkeypatch) -> str:
    """Both ways a batch holds its shared prefix: once for all rows (with the shared-prefix
    attention) or copied into each row's keys; the engine picks by the prefix's length."""
    import emoprompt.inference.passes

    ratio = 0 if request.param == "shared" else 10**9
    monkeypatch.setattr(emoprompt.inference.passes, "SHARED_PREFIX_MIN_RATIO", ratio)
    return request.param


def chat_prompts(tokenizer, systems=SYSTEMS, tweets=TWEETS) -> list[PromptParts]:
    """Chat prompts split before the user turn; suffixes of different lengths."""
    prompts = []
    for system in systems:
        head = [{"role": "system", "content": system}]
        prefix = tokenizer.apply_chat_template(head, tokenize=False)
        for tweet in tweets:
            full = tokenizer.apply_chat_template(
                [*head, {"role": "user", "content": tweet}],
                add_generation_prompt=True,
                tokenize=False,
            )
            assert full.startswith(prefix)
            prompts.append(PromptParts(prefix, full[len(prefix) :]))
    return prompts


def mixed_prompts(tokenizer) -> list[PromptParts]:
    """Two shared prefixes, a prefix used once, and a prompt given without a prefix."""
    prompts = chat_prompts(tokenizer)
    lone = chat_prompts(tokenizer, ["Un prefijo que solo usa un tuit."], ["¿Y ahora qué?"])
    return [*prompts[:5], lone[0], PromptParts("", prompts[6].text), *prompts[5:]]


def encode(tokenizer, text: str) -> list[int]:
    """A prompt's tokens as the engine defines them (BOS only if missing and default)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    default = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and default[0] == bos and ids[0] != bos:
        ids = [bos, *ids]
    return ids


@torch.inference_mode()
def naive_logprobs(model, ids: list[int], start: int = -1) -> torch.Tensor:
    """Next-token log-probabilities after positions ``start``.. of one unpadded sequence."""
    logits = model(torch.tensor([ids])).logits[0, start:]
    return torch.log_softmax(logits.double(), dim=-1)


def naive_first_token_probs(model, tokenizer, prompts, labels) -> np.ndarray:
    engine = Engine(model, tokenizer, progress=False)
    out = []
    for p in prompts:
        firsts = engine.label_first_tokens(labels, p.text)
        logp = naive_logprobs(model, encode(tokenizer, p.text))[-1, firsts]
        out.append(torch.softmax(logp, -1).numpy())
    return np.array(out)


def naive_label_logprobs(model, tokenizer, prompts, labels, end_id, normalize=False):
    out = np.zeros((len(prompts), len(labels)))
    for i, p in enumerate(prompts):
        context = encode(tokenizer, p.text)
        for j, label in enumerate(labels):
            ids = encode(tokenizer, p.text + label) + ([end_id] if end_id is not None else [])
            assert ids[: len(context)] == context
            logp = naive_logprobs(model, ids, len(context) - 1)
            scored = range(len(context), len(ids))
            out[i, j] = sum(logp[k - len(context), ids[k]].item() for k in scored)
            if normalize:
                out[i, j] /= len(scored)
    return out


def reference_generate(model, tokenizer, prompt: PromptParts, stop_ids, max_new_tokens):
    ids = torch.tensor([encode(tokenizer, prompt.text)])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(stop_ids),
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


# ----------------------------------------------------------------------------- labels
def test_label_tokens_are_those_the_tokenizer_writes_after_the_context(tiny_llama3):
    _, tokenizer = tiny_llama3
    engine = Engine(*tiny_llama3, progress=False)
    for context in (chat_prompts(tokenizer)[0].text, "Tuit: hola\nEmoción:\n"):
        base = tokenizer(context, add_special_tokens=False)["input_ids"]
        expected = [
            tokenizer(context + label, add_special_tokens=False)["input_ids"][len(base) :]
            for label in LABELS
        ]
        assert engine.label_tokens(LABELS, context) == expected
        assert engine.label_first_tokens(LABELS, context) == [ids[0] for ids in expected]
    # After a space the tokenizer writes " Ira" as one token with the space: the prompt
    # ends inside the answer's first token, which the engine refuses to guess.
    with pytest.raises(ValueError, match="token boundary"):
        engine.label_first_tokens(LABELS, "Tuit: hola\nEmoción: ")


def test_labels_sharing_a_first_token_are_refused(tiny_llama3):
    model, tokenizer = tiny_llama3
    engine = Engine(model, tokenizer, progress=False)
    labels = ["Alegría", "Sorpresa", "Sorpresivo"]
    prompts = chat_prompts(tokenizer)[:2]
    with pytest.raises(LabelCollisionError) as error:
        engine.first_token_probs(prompts, labels)
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "'Sorpresa'" in message and "'Sorpresivo'" in message
    assert "'S'" in message and "label-likelihood" in message
    with pytest.raises(LabelCollisionError):
        engine.label_first_tokens(labels, prompts[0].text)
    # The likelihood of whole labels tells them apart.
    assert engine.label_logprobs(prompts, labels).shape == (2, 3)


# ----------------------------------------------------------------------------- scores
def test_first_token_probs_equal_the_plain_computation(tiny, prefix_layout):
    model, tokenizer = tiny
    prompts = mixed_prompts(tokenizer)
    expected = naive_first_token_probs(model, tokenizer, prompts, LABELS)
    cached = Engine(model, tokenizer, batch_size=4, progress=False)
    results = {
        "cached": cached.first_token_probs(prompts, LABELS),
        "plain": Engine(
            model, tokenizer, batch_size=4, disable={"prefix_reuse"}, progress=False
        ).first_token_probs(prompts, LABELS),
        "one by one": Engine(model, tokenizer, batch_size=1, progress=False).first_token_probs(
            prompts, LABELS
        ),
    }
    for name, probs in results.items():
        assert probs.shape == (len(prompts), len(LABELS)), name
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(probs, expected, atol=ATOL, rtol=0, err_msg=name)
    assert cached.stats["fallbacks"] == 0
    assert cached.stats["prompts"] == len(prompts)
    # Each shared prefix was fed once: fewer tokens than the prompts hold.
    whole = sum(len(encode(tokenizer, p.text)) for p in prompts)
    assert cached.stats["tokens_in"] < whole - 200
    # The shared prefix cache is left as it was: a second call gives the same scores.
    np.testing.assert_array_equal(cached.first_token_probs(prompts, LABELS), results["cached"])


@pytest.mark.parametrize("normalize", [False, True])
def test_label_logprobs_equal_the_plain_computation(tiny, normalize, prefix_layout):
    model, tokenizer = tiny
    prompts = mixed_prompts(tokenizer)
    engine = Engine(model, tokenizer, batch_size=4, progress=False)
    expected = naive_label_logprobs(
        model, tokenizer, prompts, LABELS, engine.end_of_turn_id, normalize
    )
    # the path for sliding-window / flash attention models
    one_per_label = Engine(model, tokenizer, batch_size=3, disable={"tree_labels"}, progress=False)
    results = {
        "cached": engine.label_logprobs(prompts, LABELS, normalize=normalize),
        "plain": Engine(
            model, tokenizer, batch_size=4, disable={"prefix_reuse"}, progress=False
        ).label_logprobs(prompts, LABELS, normalize=normalize),
        "one by one": Engine(
            model, tokenizer, batch_size=1, disable={"prefix_reuse"}, progress=False
        ).label_logprobs(prompts, LABELS, normalize=normalize),
        "one label per pass": one_per_label.label_logprobs(prompts, LABELS, normalize=normalize),
    }
    for name, scores in results.items():
        np.testing.assert_allclose(scores, expected, atol=ATOL, rtol=0, err_msg=name)
    assert engine.stats["label_tokens"] > 0


def test_eager_attention_takes_the_same_masks(tiny_chatml):
    """The label tree's 4D mask is additive, so eager attention works as sdpa does."""
    _, tokenizer = tiny_chatml
    model = random_llama(tokenizer, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    prompts = mixed_prompts(tokenizer)
    engine = Engine(model, tokenizer, batch_size=4, progress=False)
    assert engine.capabilities.uses("tree_labels")
    np.testing.assert_allclose(
        engine.label_logprobs(prompts, LABELS),
        naive_label_logprobs(model, tokenizer, prompts, LABELS, engine.end_of_turn_id),
        atol=ATOL,
        rtol=0,
    )
    np.testing.assert_allclose(
        engine.first_token_probs(prompts, LABELS),
        naive_first_token_probs(model, tokenizer, prompts, LABELS),
        atol=ATOL,
        rtol=0,
    )


def test_label_logprobs_end_token_choices(tiny_llama3):
    model, tokenizer = tiny_llama3
    engine = Engine(model, tokenizer, batch_size=4, progress=False)
    assert tokenizer.convert_ids_to_tokens(engine.end_of_turn_id) == "<|eot_id|>"
    prompts = chat_prompts(tokenizer)[:3]
    without = engine.label_logprobs(prompts, LABELS, end_token=None)
    np.testing.assert_allclose(
        without, naive_label_logprobs(model, tokenizer, prompts, LABELS, None), atol=ATOL, rtol=0
    )
    eom = tokenizer.convert_tokens_to_ids("<|eom_id|>")
    np.testing.assert_allclose(
        engine.label_logprobs(prompts, LABELS, end_token="<|eom_id|>"),
        naive_label_logprobs(model, tokenizer, prompts, LABELS, eom),
        atol=ATOL,
        rtol=0,
    )


def test_a_split_inside_a_word_falls_back_to_the_whole_prompt(tiny_chatml, caplog):
    model, tokenizer = tiny_chatml
    good = chat_prompts(tokenizer)[:4]
    # "...<|im_start|>us" + "er\n...": the two halves tokenise differently from the whole.
    cut = len(good[0].prefix) + len("<|im_start|>us")
    bad = [PromptParts(p.text[:cut], p.text[cut:]) for p in good[:3]]
    prompts = [*good, *bad]
    engine = Engine(model, tokenizer, batch_size=4, progress=False)
    with caplog.at_level(logging.WARNING, logger="emoprompt.inference.planning"):
        probs = engine.first_token_probs(prompts, LABELS)
        logprobs = engine.label_logprobs(prompts, LABELS)
    assert engine.stats["fallbacks"] == 6  # three prompts, two calls
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "3 of 7 prompts" in warnings[0].getMessage()
    np.testing.assert_allclose(
        probs, naive_first_token_probs(model, tokenizer, prompts, LABELS), atol=ATOL, rtol=0
    )
    np.testing.assert_allclose(probs[4:], probs[:3], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logprobs[4:], logprobs[:3], atol=ATOL, rtol=0)


def test_bos_is_added_once(tiny_llama3):
    """Llama 3's tokenizer adds BOS by default and its chat template writes it too."""
    model, tokenizer = tiny_llama3
    engine = Engine(model, tokenizer, disable={"prefix_reuse"}, progress=False)
    chat = chat_prompts(tokenizer)[:2]
    plain = [PromptParts("", "Tuit: hola\nEmoción:\n"), PromptParts("", "Tuit: adiós\nEmoción:\n")]
    engine.first_token_probs(chat, LABELS)
    assert engine.stats["tokens_in"] == sum(
        len(tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in chat
    )
    before = engine.stats["tokens_in"]
    probs = engine.first_token_probs(plain, LABELS)
    assert engine.stats["tokens_in"] - before == sum(
        len(tokenizer(p.text)["input_ids"]) for p in plain
    )
    np.testing.assert_allclose(
        probs, naive_first_token_probs(model, tokenizer, plain, LABELS), atol=ATOL, rtol=0
    )


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_greedy_generation_equals_model_generate_on_each_prompt(tiny, reuse_prefix, prefix_layout):
    model, tokenizer = tiny
    prompts = mixed_prompts(tokenizer)
    engine = Engine(
        model,
        tokenizer,
        batch_size=4,
        disable=() if reuse_prefix else {"prefix_reuse"},
        progress=False,
    )
    generations = engine.generate(prompts, max_new_tokens=8)
    assert all(isinstance(g, Generation) for g in generations)
    for prompt, generation in zip(prompts, generations, strict=True):
        tokens = reference_generate(model, tokenizer, prompt, engine.stop_ids, 8)
        assert generation.text == tokenizer.decode(tokens, skip_special_tokens=True)
        assert generation.tokens_out == len(tokens)
        assert generation.tokens_in == len(encode(tokenizer, prompt.text))
    assert engine.stats["tokens_out"] == sum(g.tokens_out for g in generations)


def test_each_row_stops_at_its_stop_token(tiny_chatml):
    model, tokenizer = tiny_chatml
    prompts = chat_prompts(tokenizer)
    engine = Engine(model, tokenizer, batch_size=8, progress=False)
    free = reference_generate(model, tokenizer, prompts[1], engine.stop_ids, 6)
    k = next(k for k in range(1, len(free)) if free[k] not in free[:k])
    engine.stop_ids = engine.stop_ids | {free[k]}  # now token k of prompt 1 ends its answer
    generations = engine.generate(prompts, max_new_tokens=6)
    assert generations[1].tokens_out == k + 1
    assert generations[1].text == tokenizer.decode(free[:k], skip_special_tokens=True)
    for prompt, generation in zip(prompts, generations, strict=True):
        tokens = reference_generate(model, tokenizer, prompt, engine.stop_ids, 6)
        assert generation.tokens_out == len(tokens)
        stop = tokens[-1] in engine.stop_ids
        body = tokens[:-1] if stop else tokens
        assert generation.text == tokenizer.decode(body, skip_special_tokens=True)


def test_sampling_is_seeded(tiny_chatml):
    model, tokenizer = tiny_chatml
    prompts = chat_prompts(tokenizer)
    engine = Engine(model, tokenizer, batch_size=4, progress=False)
    first = engine.generate(prompts, max_new_tokens=6, do_sample=True, temperature=0.7, seed=3)
    again = engine.generate(prompts, max_new_tokens=6, do_sample=True, temperature=0.7, seed=3)
    other = engine.generate(prompts, max_new_tokens=6, do_sample=True, temperature=0.7, seed=4)
    assert first == again
    assert [g.text for g in first] != [g.text for g in other]
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(prompts, do_sample=True, temperature=0)


def test_progress_bar_can_be_turned_off(tiny_chatml, capsys):
    model, tokenizer = tiny_chatml
    prompts = chat_prompts(tokenizer)[:2]
    Engine(model, tokenizer, progress=False).first_token_probs(prompts, LABELS)
    assert capsys.readouterr().err == ""
    Engine(model, tokenizer, progress=True).first_token_probs(prompts, LABELS)
    assert "2/2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a real model
@pytest.mark.slow
def test_real_smollm2_cached_equals_plain_and_generate(smollm2):
    """SmolLM2-135M-Instruct: 30 layers in float32. The prefix cache changes the order
    of floating-point sums, so log-likelihoods of ~-30 differ by up to ~1e-4."""
    model, tokenizer = smollm2
    prompts = chat_prompts(tokenizer, SYSTEMS[:1], TWEETS)
    cached = Engine(model, tokenizer, batch_size=4, progress=False)
    plain = Engine(model, tokenizer, batch_size=4, disable={"prefix_reuse"}, progress=False)
    probs = cached.first_token_probs(prompts, LABELS)
    np.testing.assert_allclose(probs, plain.first_token_probs(prompts, LABELS), atol=ATOL, rtol=0)
    np.testing.assert_allclose(
        probs[:2], naive_first_token_probs(model, tokenizer, prompts[:2], LABELS), atol=ATOL, rtol=0
    )
    np.testing.assert_allclose(
        cached.label_logprobs(prompts, LABELS),
        plain.label_logprobs(prompts, LABELS),
        atol=1e-3,
        rtol=1e-5,
    )
    generations = cached.generate(prompts, max_new_tokens=10)
    lines = cached.generate(prompts, max_new_tokens=24, stop_at_newline=True)
    for prompt, generation, line in zip(prompts, generations, lines, strict=True):
        tokens = reference_generate(model, tokenizer, prompt, cached.stop_ids, 24)
        assert generation.text == tokenizer.decode(tokens[:10], skip_special_tokens=True)
        whole = tokenizer.decode(tokens, skip_special_tokens=True)
        assert line.text == whole.split("\n", 1)[0]


# ----------------------------------------------------------------------------- long rows
@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_rows_fed_in_parts_give_the_plain_computation(tiny, reuse_prefix, monkeypatch):
    """Rows longer than PREFILL_CHUNK_TOKENS are fed in parts through the cache (a tweet
    cut to the context): with parts of 5 tokens, padded rows and prefix reuse included,
    every method equals the plain computation."""
    import emoprompt.inference.passes

    monkeypatch.setattr(emoprompt.inference.passes, "PREFILL_CHUNK_TOKENS", 5)
    model, tokenizer = tiny
    prompts = mixed_prompts(tokenizer)
    engine = Engine(
        model,
        tokenizer,
        batch_size=4,
        disable=() if reuse_prefix else {"prefix_reuse"},
        progress=False,
    )
    passes_before = engine.stats["forward_passes"]
    np.testing.assert_allclose(
        engine.first_token_probs(prompts, LABELS),
        naive_first_token_probs(model, tokenizer, prompts, LABELS),
        atol=ATOL,
        rtol=0,
    )
    assert engine.stats["forward_passes"] - passes_before > len(prompts) // 4 + 1  # in parts
    np.testing.assert_allclose(
        engine.label_logprobs(prompts, LABELS),
        naive_label_logprobs(model, tokenizer, prompts, LABELS, engine.end_of_turn_id),
        atol=ATOL,
        rtol=0,
    )
    for prompt, generation in zip(prompts, engine.generate(prompts, max_new_tokens=6), strict=True):
        tokens = reference_generate(model, tokenizer, prompt, engine.stop_ids, 6)
        assert generation.text == tokenizer.decode(tokens, skip_special_tokens=True)


# ----------------------------------------------------------------------------- reference
def test_the_reference_backend_is_the_naive_computation(tiny):
    """The plain reference backend, which the conformance matrix and `make bench` compare
    the engine with, computes what the naive code above does."""
    from emoprompt.inference.reference import ReferenceBackend

    model, tokenizer = tiny
    prompts = mixed_prompts(tokenizer)
    reference = ReferenceBackend(model, tokenizer)
    end_id = reference.rules.end_of_turn_id
    np.testing.assert_allclose(
        reference.first_token_probs(prompts, LABELS),
        naive_first_token_probs(model, tokenizer, prompts, LABELS),
        atol=1e-6,
        rtol=0,
    )
    for normalize in (False, True):
        np.testing.assert_allclose(
            reference.label_logprobs(prompts, LABELS, normalize=normalize),
            naive_label_logprobs(model, tokenizer, prompts, LABELS, end_id, normalize),
            atol=1e-5,
            rtol=0,
        )
    generations = reference.generate(prompts[:4], max_new_tokens=6)
    for prompt, generation in zip(prompts[:4], generations, strict=True):
        tokens = reference_generate(model, tokenizer, prompt, reference.stop_ids, 6)
        body = tokens[:-1] if tokens and tokens[-1] in reference.stop_ids else tokens
        assert generation.text == tokenizer.decode(body, skip_special_tokens=True)
        assert generation.tokens_out == len(tokens)
    assert reference.describe()["speedups"] == []
