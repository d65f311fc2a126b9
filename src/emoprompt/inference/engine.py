"""The inference engine: the fast :class:`~emoprompt.inference.backend.Backend`.

Over any Hugging Face causal LM (model and tokenizer already loaded by the caller):

* :meth:`Engine.first_token_probs` - next-token probabilities of each label's first
  token, renormalised over the labels (one forward pass per batch, last position only);
* :meth:`Engine.label_logprobs` - log-likelihood of each label's whole token sequence
  (plus the end-of-turn token) as the answer;
* :meth:`Engine.generate` - batched greedy decoding (or seeded sampling).

The engine is a facade over parts with one job each:

* :mod:`emoprompt.inference.tokens` - how prompts, labels and answer ends are tokenised
  (shared with fine-tuning);
* :mod:`emoprompt.inference.capabilities` - which speed-ups the model may use, from the
  table of what the conformance matrix has proven, decided once per engine;
* :mod:`emoprompt.inference.planning` - prompts grouped by shared prefix and cut into
  batches;
* :mod:`emoprompt.inference.passes` - forward passes with prefix KV-cache reuse;
* :mod:`emoprompt.inference.scoring` and :mod:`emoprompt.inference.generation` - the
  three methods above.

Prompts may be :class:`emoprompt.prompting.render.PromptParts` or any object with
``prefix`` and ``suffix`` strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from emoprompt.inference import capabilities, generation, scoring
from emoprompt.inference.backend import END_OF_TURN, Backend, Decoding, Generation, new_stats
from emoprompt.inference.passes import ForwardPasses
from emoprompt.inference.planning import BatchPlanner
from emoprompt.inference.tokens import LabelCollisionError, TokenizerRules
from emoprompt.prompting.render import PromptParts

__all__ = ["END_OF_TURN", "Engine", "Generation", "LabelCollisionError", "PromptParts"]

# Tokens of key/value cache (rows x cached length) that one batch may hold; a batch of
# long few-shot prompts is made smaller than ``batch_size`` to stay under it.
DEFAULT_MAX_BATCH_TOKENS = 16384


class Engine(Backend):
    """Batched, prefix-cached scoring and generation with a Hugging Face causal LM.

    ``model`` and ``tokenizer`` are loaded by the caller; the tokenizer must have a pad
    token (``padding_side`` does not matter: the engine pads on the left itself). The
    model is put in eval mode; everything runs under ``torch.inference_mode`` on the
    model's device. ``speedups``: ``"auto"`` uses those the capability table has proven
    for the model (:mod:`emoprompt.inference.capabilities`), ``"none"`` the safe path
    (batched, whole prompts, plain modules), or a list of names (proven or not: for
    the conformance matrix); ``disable`` names speed-ups not to use.
    ``max_batch_tokens`` bounds rows x cached length per batch.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 16,
        speedups: str | Iterable[str] = "auto",
        disable: Iterable[str] = (),
        progress: bool = True,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        self._dtype = next(
            (p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32
        )
        self.stats = new_stats()
        self.rules = TokenizerRules(tokenizer)
        self.end_of_turn_id = self.rules.end_of_turn_id
        gen_config = getattr(model, "generation_config", None)
        self.stop_ids = self.rules.stop_ids(getattr(gen_config, "eos_token_id", None))
        self.capabilities = capabilities.detect(
            model, self.rules, speedups=speedups, disable=disable
        )
        self.passes = ForwardPasses(model, self.capabilities, self.pad_id, self.stats, progress)
        self.planner = BatchPlanner(
            rules=self.rules,
            stats=self.stats,
            shares_prefix=self.passes.shares_prefix,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            # What one forward pass costs beyond its tokens, in tokens: on a CPU a pass
            # over a few tokens costs about as much as 30 more tokens; accelerators
            # favour full batches.
            pass_cost_tokens=32 if self.device.type == "cpu" else 4096,
            reuse_prefix=self.capabilities.uses("prefix_reuse"),
            window=capabilities.attention_window(model),
        )

    @property
    def batch_size(self) -> int:
        return self.planner.batch_size

    @property
    def reuse_prefix(self) -> bool:
        return self.planner.reuse_prefix

    @property
    def packed_weights(self) -> bool:
        """Whether linear layers run through oneDNN with packed weights."""
        return self.capabilities.uses("packed_weights")

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "engine",
            "device": str(self.device),
            "dtype": str(self._dtype).removeprefix("torch."),
            "batch_size": self.batch_size,
            **self.capabilities.record(),
        }

    # ------------------------------------------------------------------ labels
    def label_tokens(self, labels: Sequence[str], context: str) -> list[list[int]]:
        """Each label's tokens as the tokenizer writes them right after ``context``."""
        return self.rules.label_tokens(labels, context)

    def label_first_tokens(self, labels: Sequence[str], context: str) -> list[int]:
        """The first token of each label as the tokenizer writes it right after ``context``.

        Raises :class:`LabelCollisionError` if two labels share their first token.
        """
        return self.rules.label_first_tokens(labels, context)

    # ------------------------------------------------------------------ strategies
    @torch.inference_mode()
    def first_token_probs(
        self, prompts: Sequence[PromptParts], labels: Sequence[str]
    ) -> np.ndarray:
        """(n_prompts, n_labels): next-token probabilities of each label's first token,
        renormalised over the labels (softmax over those logits); rows sum to 1."""
        prompts = list(prompts)
        if not prompts:
            return np.zeros((0, len(labels)))
        return scoring.first_token_probs(self.passes, self.planner, self.rules, prompts, labels)

    @torch.inference_mode()
    def label_logprobs(
        self,
        prompts: Sequence[PromptParts],
        labels: Sequence[str],
        *,
        end_token: str | None = END_OF_TURN,
        normalize: bool = False,
    ) -> np.ndarray:
        """(n_prompts, n_labels): log-likelihood of each label's tokens as the answer.

        The label's tokens are those the tokenizer writes after the prompt; ``end_token``
        (default: the end-of-turn token, e.g. ``<|eot_id|>``/``<|im_end|>``, else EOS;
        ``None``: nothing) is scored after them. ``normalize=True`` divides by the number
        of scored tokens. Each prompt is encoded once; its labels are scored as
        continuations of its cache.
        """
        prompts = list(prompts)
        if not prompts:
            return np.zeros((0, len(labels)))
        end_ids = self.rules.end_ids(end_token, END_OF_TURN)
        return scoring.label_logprobs(
            self.passes,
            self.planner,
            self.rules,
            prompts,
            labels,
            end_ids,
            normalize=normalize,
            dtype=self._dtype,
        )

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
        """Batched greedy decoding (or sampling at ``temperature`` with a generator seeded
        with ``seed``). A row stops at EOS / end of turn (and at its first newline with
        ``stop_at_newline``, the text being cut there); the batch stops when all rows have.
        The text is decoded without special tokens. Greedy output equals
        ``model.generate(do_sample=False)`` on each prompt alone, with these stop tokens.
        Sampled output depends on the seed and on how prompts fall into batches."""
        decoding = Decoding(max_new_tokens, do_sample, temperature, seed, stop_at_newline)
        return generation.generate(
            self.passes, self.planner, self.rules, self.stop_ids, list(prompts), decoding
        )
