"""oneDNN-packed linear layers compute what the plain layers compute."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emoprompt.inference import packed_linear
from emoprompt.inference.agreement import logits_agree
from emoprompt.inference.engine import Engine
from emoprompt.inference.packed_linear import PackedLinears
from emoprompt.labels import LABELS

pytestmark = pytest.mark.skipif(
    packed_linear._ops() is None, reason="this torch build has no oneDNN linear ops"
)

TEXT = "Hoy es un gran día, ¡por fin ganamos!"


def ids_of(tokenizer, text=TEXT):
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def linears(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


@torch.inference_mode()
def test_packed_layers_give_the_plain_logits_and_step_aside_afterwards(tiny_llama):
    model, tokenizer = tiny_llama
    packed = PackedLinears.of(model, exclude=[model.lm_head])
    assert packed is not None
    assert model.lm_head not in packed.modules
    assert len(packed.modules) == len(linears(model)) - 1
    assert packed.nbytes == sum(m.weight.numel() * 4 for m in packed.modules)

    ids = ids_of(tokenizer)
    plain = model(input_ids=ids).logits
    calls = []
    product = packed._product
    packed._product = lambda *args: calls.append(1) or product(*args)
    with packed.active():
        assert all("forward" in vars(m) for m in packed.modules)
        fast = model(input_ids=ids).logits
    # Every packed layer ran through oneDNN's product, once per forward pass.
    assert len(calls) == len(packed.modules)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert not any("forward" in vars(m) for m in packed.modules)
    assert logits_agree(model, ids, packed.active)


def test_a_changed_weight_is_packed_again():
    layer = torch.nn.Linear(32, 48)
    packed = PackedLinears([layer])
    first = packed._packed[0]
    x = torch.randn(5, 32)
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # in place
        with packed.active():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        assert packed._packed[0] is not first
        layer.weight = torch.nn.Parameter(torch.randn(48, 32))  # replaced
        with packed.active():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        again = packed._packed[0]
        with packed.active():  # unchanged: the packed copy is kept
            layer(x)
        assert packed._packed[0] is again


def test_gradients_take_the_plain_path():
    layer = torch.nn.Linear(8, 4)
    packed = PackedLinears([layer])
    x = torch.randn(3, 8)
    with packed.active():
        layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(4, 8))


def test_only_float32_cpu_linear_layers_are_packed():
    odd = torch.nn.Sequential(torch.nn.Linear(4, 4).double(), torch.nn.Conv1d(2, 2, 1))
    assert PackedLinears.of(odd) is None
    with pytest.raises(ValueError, match="not a float32 CPU"):
        PackedLinears([torch.nn.Linear(4, 4).to(torch.bfloat16)])


def test_no_packing_where_memory_is_short(tiny_llama, monkeypatch, caplog):
    model, _ = tiny_llama
    size = sum(m.weight.numel() * 4 for m in linears(model))
    monkeypatch.setattr(packed_linear, "available_memory", lambda: size)  # twice the share
    with caplog.at_level(logging.INFO, logger="emoprompt.inference.packed_linear"):
        assert PackedLinears.of(model) is None
    assert "not packed" in caplog.text
    monkeypatch.setattr(packed_linear, "available_memory", lambda: 3 * size)
    assert PackedLinears.of(model) is not None


def test_engine_scores_and_generation_do_not_depend_on_packing(tiny_llama):
    from test_engine import mixed_prompts

    model, tokenizer = tiny_llama
    prompts = mixed_prompts(tokenizer)
    packed = Engine(model, tokenizer, batch_size=4, progress=False)
    plain = Engine(model, tokenizer, batch_size=4, progress=False, disable={"packed_weights"})
    assert packed.capabilities.packed is not None and plain.capabilities.packed is None
    np.testing.assert_allclose(
        packed.first_token_probs(prompts, LABELS),
        plain.first_token_probs(prompts, LABELS),
        atol=1e-5,
        rtol=0,
    )
    assert [g.text for g in packed.generate(prompts, max_new_tokens=6)] == [
        g.text for g in plain.generate(prompts, max_new_tokens=6)
    ]
    assert not any("forward" in vars(m) for m in linears(model))


def test_the_engine_refuses_packing_that_changes_the_logits(tiny_llama, caplog, monkeypatch):
    model, tokenizer = tiny_llama
    original = packed_linear.PackedLinears._forward

    def skewed(self, i):
        forward = original(self, i)
        return lambda x: forward(x) * 1.5

    monkeypatch.setattr(packed_linear.PackedLinears, "_forward", skewed)
    odd = copy.deepcopy(model)  # the checks are remembered per model
    with caplog.at_level(logging.WARNING, logger="emoprompt.inference.capabilities"):
        engine = Engine(odd, tokenizer, progress=False)
    assert engine.capabilities.packed is None
    assert "oneDNN" in caplog.text


def test_the_checks_run_once_per_model(tiny_llama):
    model, tokenizer = tiny_llama
    model = copy.deepcopy(model)
    passes = []
    model.register_forward_hook(lambda *args: passes.append(1))
    first = Engine(model, tokenizer, progress=False)
    assert first.packed_weights
    assert len(passes) == 2  # plain and packed
    second = Engine(model, tokenizer, progress=False)
    assert second.packed_weights
    assert len(passes) == 2


def test_the_engine_setting_turns_packing_off(tmp_path, tiny_llama_dir):
    import json
    from pathlib import Path

    import pandas as pd

    from emoprompt.evaluation.job import run_prediction

    repo = Path(__file__).resolve().parents[1]
    rows = [
        {"id": f"t{i}", "event": "e", "tweet": f"tuit número {i}", "offensive": "NO",
         "label": LABELS[i % len(LABELS)]}
        for i in range(4)
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "split.tsv", sep="\t", index=False)
    entry = {"source": "local", "path": str(tiny_llama_dir), "prompt_format": "chat",
             "dtype": "float32", "quantization": "none", "allow_fallback": False,
             "location": str(tiny_llama_dir)}  # fmt: skip
    used = {}
    for packed in (True, False):
        out = tmp_path / str(packed)
        run_prediction(
            model_name="tiny",
            entry=entry,
            strategy_name="zero_shot_first_token",
            prompt_path=str(repo / "prompts" / "zero_shot.yaml"),
            train_path=str(tmp_path / "split.tsv"),
            sample_path=str(tmp_path / "split.tsv"),
            settings={"engine": {"threads": 1, "disable": [] if packed else ["packed_weights"]}},
            job_threads=1,
            tsv_out=str(out / "p.tsv"),
            json_out=str(out / "p.json"),
        )
        speedups = json.loads((out / "p.json").read_text())["backend"]["speedups"]
        used[packed] = "packed_weights" in speedups
        predicted = pd.read_csv(out / "p.tsv", sep="\t")["predicted"].tolist()
        used[packed, "predicted"] = predicted
    assert used[True] is True and used[False] is False
    assert used[True, "predicted"] == used[False, "predicted"]
