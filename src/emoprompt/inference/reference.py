"""The plain reference backend: what every faster way of computing is checked against.

Nothing clever: each prompt (and each prompt + label) is one unpadded
``model(input_ids)`` call with the full vocabulary's logits, no cache, no patches;
answers come from transformers' own ``model.generate`` on each prompt alone. Tokens are
those of :class:`emoprompt.inference.tokens.TokenizerRules` (the rules the engine and
fine-tuning share), labels tokenised after each whole prompt. It is slow on purpose:
tests, the conformance matrix (:mod:`emoprompt.bench.conformance`) and ``make bench``
compare the engine with it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from emoprompt.inference.backend import (
    END_OF_TURN,
    Backend,
    Decoding,
    Generation,
    answer,
    new_stats,
    until_stop,
)
from emoprompt.inference.capabilities import base_model
from emoprompt.inference.tokens import TokenizerRules
from emoprompt.prompting.render import PromptParts


class ReferenceBackend(Backend):
    """One forward pass per prompt (and label), ``model.generate`` per prompt."""

    def __init__(self, model: Any, tokenizer: Any, *, progress: bool = False) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.rules = TokenizerRules(tokenizer)
        self.device = next(model.parameters()).device
        self.stats = new_stats()
        self.progress = progress
        gen_config = getattr(model, "generation_config", None)
        self.stop_ids = self.rules.stop_ids(getattr(gen_config, "eos_token_id", None))
        # (prompt ids, answer ids) -> summed log-probability: a sequence scored again
        # (the same label length-normalised or not) is not computed twice.
        self._scores: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = {}
        self._keeps_logits = (
            "logits_to_keep" in inspect.signature(base_model(model).forward).parameters
        )

    def describe(self) -> dict[str, Any]:
        dtype = next(p.dtype for p in self.model.parameters() if p.dtype.is_floating_point)
        return {
            "backend": "reference",
            "device": str(self.device),
            "dtype": str(dtype).removeprefix("torch."),
            "speedups": [],
        }

    def _bar(self, prompts: Sequence[PromptParts], desc: str):
        return tqdm(prompts, desc=desc, unit="prompt", disable=not self.progress)

    @torch.inference_mode()
    def _logits(self, ids: list[int], start: int) -> torch.Tensor:
        """(len(ids) - start, vocab) float64 logits of positions ``start``.. (negative:
        from the end) of one unpadded sequence; transformers' ``logits_to_keep`` skips
        the LM head for the positions before."""
        self.stats["forward_passes"] += 1
        self.stats["tokens_in"] += len(ids)
        keep = -start if start < 0 else len(ids) - start
        kwargs = {"logits_to_keep": keep} if self._keeps_logits else {}
        out = self.model(input_ids=torch.tensor([ids], device=self.device), **kwargs)
        return out.logits[0, -keep:].double().cpu()

    def label_first_tokens(self, labels: Sequence[str], context: str) -> list[int]:
        firsts = [seq[0] for seq in self.rules.label_seqs_of([context], labels)[0]]
        self.rules.check_collisions(labels, firsts)
        return firsts

    def first_token_probs(
        self, prompts: Sequence[PromptParts], labels: Sequence[str]
    ) -> np.ndarray:
        out = np.zeros((len(prompts), len(labels)))
        for i, prompt in enumerate(self._bar(prompts, "first-token scores (reference)")):
            firsts = self.label_first_tokens(labels, prompt.text)
            logits = self._logits(self.rules.encode_prompt(prompt.text), -1)[0]
            out[i] = torch.softmax(logits[firsts], dim=-1).numpy()
            self.stats["prompts"] += 1
        return out

    def label_logprobs(
        self,
        prompts: Sequence[PromptParts],
        labels: Sequence[str],
        *,
        end_token: str | None = END_OF_TURN,
        normalize: bool = False,
    ) -> np.ndarray:
        end_ids = self.rules.end_ids(end_token, END_OF_TURN)
        out = np.zeros((len(prompts), len(labels)))
        for i, prompt in enumerate(self._bar(prompts, "label likelihoods (reference)")):
            context = self.rules.encode_prompt(prompt.text)
            for j, seq in enumerate(self.rules.label_seqs_of([prompt.text], labels)[0]):
                answer = seq + end_ids
                score = self._score(context, answer)
                out[i, j] = score / len(answer) if normalize else score
            self.stats["prompts"] += 1
        return out

    def _score(self, context: list[int], answer: list[int]) -> float:
        """log P(answer | context): one forward pass over context + answer."""
        key = (tuple(context), tuple(answer))
        if key not in self._scores:
            logits = self._logits(context + answer, len(context) - 1)[:-1]
            logprobs = torch.log_softmax(logits, dim=-1)
            self._scores[key] = logprobs[torch.arange(len(answer)), answer].sum().item()
            self.stats["label_tokens"] += len(answer)
        return self._scores[key]

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[PromptParts],
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
        stop_at_newline: bool = False,
    ) -> list[Generation]:
        decoding = Decoding(max_new_tokens, do_sample, temperature, seed, stop_at_newline)
        sampling = {"do_sample": True, "temperature": temperature} if do_sample else {}
        if do_sample:
            torch.manual_seed(seed)
        out = []
        for prompt in self._bar(prompts, "generation (reference)"):
            ids = torch.tensor([self.rules.encode_prompt(prompt.text)], device=self.device)
            tokens = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(self.stop_ids),
                pad_token_id=self.tokenizer.pad_token_id,
                **({"do_sample": False, "top_k": None, "top_p": None} | sampling),
            )[0, ids.shape[1] :].tolist()
            tokens = until_stop(self.rules, self.stop_ids, tokens, stop_at_newline)
            self.stats["prompts"] += 1
            self.stats["tokens_in"] += ids.shape[1]
            self.stats["tokens_out"] += len(tokens)
            out.append(answer(self.rules, self.stop_ids, tokens, ids.shape[1], decoding))
        return out
