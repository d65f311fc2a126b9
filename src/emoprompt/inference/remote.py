"""A model behind an OpenAI-compatible server (``vllm serve``, SGLang...) as a backend.

Prompts are tokenised here, with the same :class:`TokenizerRules` as the in-process
backends (the served model's own tokenizer, from its catalogue entry), and sent as token
ids to the completions API, so the server sees exactly the tokens the engine would:

* **first token**: one request per prompt for one token, with the log-probabilities of
  the labels' first tokens (vLLM's ``logprob_token_ids``: the model's raw, unprocessed
  distribution), renormalised over the labels here, as the reference does;
* **label likelihood**: the labels' tokens and the end token scored position by
  position, one one-token request per distinct prefix of the labels after the prompt
  (a tree: the prompt is shared, and the server's prefix cache computes it once), with
  the log-probabilities of the tokens that follow there (``logprob_token_ids``);
* **generation**: greedy (temperature 0) or sampled with the request's seed, stopped at
  the tokenizer's stop tokens; the answer is cut at the first stop token (or newline)
  exactly as the reference cuts it.

A server that takes no token ids (a hosted API) is asked through its chat-completions
API instead (``api: chat``, :class:`ChatBackend`): the prompt's chat turns are sent and
the server applies its own chat template; first-token scores come from its top
log-probabilities, matched to the labels by text (:func:`label_probs`); label likelihood
is refused, since such an API returns no log-probabilities for given answer tokens.

Requests go through :class:`emoprompt.infra.http.JsonClient` (bounded concurrency,
timeouts, retries, the request cache).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emoprompt.inference.backend import (
    END_OF_TURN,
    Backend,
    Decoding,
    Generation,
    answer,
    new_stats,
    until_stop,
)
from emoprompt.inference.tokens import TokenizerRules
from emoprompt.infra.http import JsonClient, ServerError, request_key
from emoprompt.prompting.render import PromptParts

COMPLETIONS = "/completions"
CHAT = "/chat/completions"


def server_info(client: JsonClient, served_model: str) -> dict[str, Any]:
    """What the server says about itself and ``served_model``: its version (where it has
    a ``/version`` endpoint, as vLLM does), the model's id, root and context length.

    Raises :class:`ServerError` when the server does not answer or serves no such model."""
    models = client.get("/models").get("data", [])
    served = {m.get("id"): m for m in models}
    if served_model not in served:
        raise ServerError(
            f"{client.base_url} serves {sorted(served) or 'no model'}, not {served_model!r}: "
            "set served_model in the catalogue entry to one of these"
        )
    model = served[served_model]
    info: dict[str, Any] = {
        "server": client.base_url,
        "served_model": served_model,
        "model_root": model.get("root"),
        "owned_by": model.get("owned_by"),
        "max_model_len": model.get("max_model_len"),
    }
    root = JsonClient(client.base_url.removesuffix("/v1"), timeout=client.timeout, retries=0)
    try:
        info["server_version"] = root.get("/version").get("version")
    except ServerError:
        info["server_version"] = None
    return info


class OpenAIBackend(Backend):
    """The three questions of :class:`Backend`, asked of a server (module docstring)."""

    def __init__(
        self,
        client: JsonClient,
        tokenizer: Any,
        info: Mapping[str, Any],
        *,
        generation_eos: int | Sequence[int] | None = None,
    ) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.rules = TokenizerRules(tokenizer)
        self.info = dict(info)
        self.model = self.info["served_model"]
        self.device = "server"
        self.stats = new_stats()
        self.stop_ids = self.rules.stop_ids(generation_eos)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "openai",
            "api": "completions (token ids)",
            "device": "server",
            "dtype": self.info.get("dtype"),
            "speedups": [],
            **{k: v for k, v in self.info.items() if k != "dtype"},
            "requests": dict(self.client.stats),
        }

    def _body(self, ids: list[int], **fields: Any) -> dict[str, Any]:
        return {"model": self.model, "prompt": ids, "temperature": 0.0, **fields}

    def _ask(self, bodies: list[dict[str, Any]], desc: str) -> list[dict[str, Any]]:
        answers = self.client.post_many(COMPLETIONS, bodies, desc=desc)
        self.stats["forward_passes"] += len(bodies)
        self.stats["tokens_in"] += sum(len(b["prompt"]) for b in bodies)
        return [a["choices"][0] for a in answers]

    def label_first_tokens(self, labels: Sequence[str], context: str) -> list[int]:
        return self.rules.label_first_tokens(labels, context)

    def first_token_probs(
        self, prompts: Sequence[PromptParts], labels: Sequence[str]
    ) -> np.ndarray:
        firsts = [self.label_first_tokens(labels, p.text) for p in prompts]
        bodies = [
            self._next_token_body(self.rules.encode_prompt(p.text), ids)
            for p, ids in zip(prompts, firsts, strict=True)
        ]
        out = np.zeros((len(prompts), len(labels)))
        choices = self._ask(bodies, "first-token scores")
        for i, (choice, ids) in enumerate(zip(choices, firsts, strict=True)):
            logprobs = _token_logprobs(choice, ids)
            out[i] = np.exp(logprobs - logprobs.max())
            out[i] /= out[i].sum()
        self.stats["prompts"] += len(prompts)
        return out

    def label_logprobs(
        self,
        prompts: Sequence[PromptParts],
        labels: Sequence[str],
        *,
        end_token: str | None = END_OF_TURN,
        normalize: bool = False,
    ) -> np.ndarray:
        """Each label's tokens (and the end token) scored one position at a time: one
        one-token request per distinct prefix of the labels (the labels' tree), asking
        for the log-probabilities of the tokens that follow it there. The server's prefix
        cache computes the shared prompt once; asking for the prompt's own
        log-probabilities instead would recompute every position of it for every label."""
        end_ids = self.rules.end_ids(end_token, END_OF_TURN)
        texts = [p.text for p in prompts]
        answers = [[seq + end_ids for seq in seqs] for seqs in self.rules.label_seqs(texts, labels)]
        steps: dict[tuple[int, ...], set[int]] = {}  # prefix -> the tokens asked for after it
        contexts = [tuple(self.rules.encode_prompt(text)) for text in texts]
        for context, seqs in zip(contexts, answers, strict=True):
            for seq in seqs:
                for k, token in enumerate(seq):
                    steps.setdefault(context + tuple(seq[:k]), set()).add(token)
        asked = {prefix: sorted(tokens) for prefix, tokens in steps.items()}
        bodies = [self._next_token_body(list(p), tokens) for p, tokens in asked.items()]
        found = {}
        choices = self._ask(bodies, "label likelihoods")
        for (prefix, tokens), choice in zip(asked.items(), choices, strict=True):
            logprobs = _token_logprobs(choice, tokens)
            found.update({(prefix, t): v for t, v in zip(tokens, logprobs, strict=True)})
        out = np.zeros((len(prompts), len(labels)))
        for i, (context, seqs) in enumerate(zip(contexts, answers, strict=True)):
            for j, seq in enumerate(seqs):
                score = sum(found[(context + tuple(seq[:k]), t)] for k, t in enumerate(seq))
                out[i, j] = score / len(seq) if normalize else score
                self.stats["label_tokens"] += len(seq)
        self.stats["prompts"] += len(prompts)
        return out

    def _next_token_body(self, ids: list[int], tokens: list[int]) -> dict[str, Any]:
        """One token after ``ids``, with the raw log-probabilities of ``tokens`` there."""
        return self._body(
            ids,
            max_tokens=1,
            logprobs=1,
            logprob_token_ids=tokens,
            return_tokens_as_token_ids=True,
        )

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
        sampling = {"temperature": temperature, "seed": seed} if do_sample else {}
        encoded = [self.rules.encode_prompt(p.text) for p in prompts]
        bodies = [
            {
                **self._body(ids, max_tokens=max_new_tokens, stop_token_ids=sorted(self.stop_ids)),
                "return_token_ids": True,
                "skip_special_tokens": False,
                **sampling,
            }
            for ids in encoded
        ]
        out = []
        for ids, choice in zip(encoded, self._ask(bodies, "generation"), strict=True):
            tokens = _generated_ids(choice)
            tokens = until_stop(self.rules, self.stop_ids, tokens, stop_at_newline)
            self.stats["prompts"] += 1
            self.stats["tokens_out"] += len(tokens)
            out.append(answer(self.rules, self.stop_ids, tokens, len(ids), decoding))
        return out


class ChatBackend(Backend):
    """A server's chat-completions API (``api: chat``): the prompt's chat turns are sent,
    not token ids, so it serves models without a local tokenizer (hosted APIs).

    * **first token**: one one-token request per prompt with the ``top_logprobs`` most
      likely first tokens; each label's probability is the sum over those that start it
      (:func:`label_probs`), renormalised over the labels. Labels none of whose starts
      is among them score 0 and are counted (``stats["labels_absent"]``); a tweet with
      no label among them is left unscored (NaN, counted in ``stats["unscored"]``): it
      gets the fallback label and counts as unparsed;
    * **generation**: greedy (temperature 0) or sampled with the request's seed; the
      answer is the server's text, cut at its first newline where asked;
    * **label likelihood**: refused (no log-probabilities of given answer tokens).
    """

    def __init__(
        self,
        client: JsonClient,
        info: Mapping[str, Any],
        *,
        top_logprobs: int,
        template_kwargs: Mapping[str, Any] | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.client = client
        self.info = dict(info)
        self.model = self.info["served_model"]
        self.top_logprobs = top_logprobs
        self.template_kwargs = dict(template_kwargs or {})
        self.rules = TokenizerRules(tokenizer) if tokenizer is not None else None
        self.device = "server"
        self.stats = new_stats()
        self.stats.update(labels_absent=0, unscored=0)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "openai",
            "api": "chat completions (messages)",
            "first_token": f"top {self.top_logprobs} log-probabilities, matched to the labels",
            "device": "server",
            "dtype": self.info.get("dtype"),
            "speedups": [],
            **{k: v for k, v in self.info.items() if k != "dtype"},
            "requests": dict(self.client.stats),
            "labels_absent": int(self.stats["labels_absent"]),
            "unscored": int(self.stats["unscored"]),
        }

    def _body(self, prompt: PromptParts, **fields: Any) -> dict[str, Any]:
        if prompt.messages is None:
            raise ValueError(
                f"{self.model}: a chat-completions API (api: chat) takes chat prompts; "
                "plain prompts (prompt_format: plain) need api: completions"
            )
        extra = {"chat_template_kwargs": self.template_kwargs} if self.template_kwargs else {}
        messages = [dict(m) for m in prompt.messages]
        return {"model": self.model, "messages": messages, "temperature": 0.0, **extra, **fields}

    def _ask(self, bodies: list[dict[str, Any]], desc: str) -> list[dict[str, Any]]:
        answers = self.client.post_many(CHAT, bodies, desc=desc)
        self.stats["forward_passes"] += len(bodies)
        for reply in answers:
            usage = reply.get("usage") or {}
            self.stats["tokens_in"] += int(usage.get("prompt_tokens") or 0)
            self.stats["tokens_out"] += int(usage.get("completion_tokens") or 0)
        return answers

    def label_first_tokens(self, labels: Sequence[str], context: str) -> list[int]:
        """The labels' first tokens where a local tokenizer is named (for the records);
        none otherwise: the labels are matched to the server's tokens by text."""
        return self.rules.label_first_tokens(labels, context) if self.rules else []

    def first_token_probs(
        self, prompts: Sequence[PromptParts], labels: Sequence[str]
    ) -> np.ndarray:
        fields = {"max_completion_tokens": 1, "logprobs": True, "top_logprobs": self.top_logprobs}
        bodies = [self._body(p, **fields) for p in prompts]
        out = np.full((len(prompts), len(labels)), np.nan)
        for i, reply in enumerate(self._ask(bodies, "first-token scores")):
            found = label_probs(_top_logprobs(reply["choices"][0]), labels)
            self.stats["labels_absent"] += int((found == 0).sum())
            if found.sum() > 0:
                out[i] = found / found.sum()
            else:
                self.stats["unscored"] += 1
        self.stats["prompts"] += len(prompts)
        return out

    def label_logprobs(
        self,
        prompts: Sequence[PromptParts],
        labels: Sequence[str],
        *,
        end_token: str | None = END_OF_TURN,
        normalize: bool = False,
    ) -> np.ndarray:
        raise ServerError(
            f"{self.model}: label likelihood needs the log-probabilities of given answer "
            "tokens, which a chat-completions API does not return: use a first-token or "
            "generation strategy, or api: completions with a vLLM server"
        )

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
        Decoding(max_new_tokens, do_sample, temperature, seed, stop_at_newline)  # checks
        fields: dict[str, Any] = {"max_completion_tokens": max_new_tokens}
        if do_sample:
            fields.update(temperature=temperature, seed=seed)
        if stop_at_newline:
            fields["stop"] = ["\n"]
        out = []
        for reply in self._ask([self._body(p, **fields) for p in prompts], "generation"):
            text = (reply["choices"][0].get("message") or {}).get("content") or ""
            usage = reply.get("usage") or {}
            self.stats["prompts"] += 1
            out.append(
                Generation(
                    text=text.split("\n", 1)[0] if stop_at_newline else text,
                    tokens_in=int(usage.get("prompt_tokens") or 0),
                    tokens_out=int(usage.get("completion_tokens") or 0),
                )
            )
        return out


def label_probs(top: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> np.ndarray:
    """Each label's probability of starting the answer, from a chat API's most likely
    first tokens (``top``: ``{"token", "logprob"}`` entries), not renormalised.

    A token counts for a label when its text, without leading white space and ignoring
    case, is a non-empty start of that label and of no other (so ``"Al"`` counts for
    Alegría), or is the label followed by no letter (``"Ira,"``). A label none of whose
    tokens is in ``top`` gets 0."""
    folded = [label.casefold() for label in labels]
    out = np.zeros(len(labels))
    for entry in top:
        start = str(entry.get("token", "")).lstrip().casefold()
        if not start:
            continue
        hits = [
            j
            for j, label in enumerate(folded)
            if label.startswith(start)
            or (start.startswith(label) and not start[len(label) : len(label) + 1].isalpha())
        ]
        if len(hits) == 1:
            out[hits[0]] += math.exp(float(entry["logprob"]))
    return out


def _top_logprobs(choice: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The top log-probabilities of a chat answer's first token ([] if it has none)."""
    logprobs = choice.get("logprobs")
    if not logprobs or "content" not in logprobs:
        raise ServerError(
            "the server returned no top log-probabilities (logprobs, top_logprobs) for the "
            "answer: first-token scoring through a chat API needs them; use a generation "
            "strategy with this model"
        )
    content = logprobs.get("content") or []
    return list(content[0].get("top_logprobs") or []) if content else []


def _token_logprobs(choice: Mapping[str, Any], ids: Sequence[int]) -> np.ndarray:
    """The log-probabilities of ``ids`` at the first generated position."""
    logprobs = choice.get("logprobs") or {}
    top = (logprobs.get("top_logprobs") or [None])[0]
    if not top:
        raise ServerError(
            "the server returned no log-probabilities for the label tokens: first-token and "
            "label-likelihood scoring need a server with vLLM's logprob_token_ids; use a "
            "generation strategy with this model"
        )
    found = {int(str(k).removeprefix("token_id:")): v for k, v in top.items()}
    missing = [t for t in ids if t not in found]
    if missing:
        raise ServerError(f"the server left out the log-probabilities of tokens {missing}")
    return np.array([float(found[t]) for t in ids])


def _generated_ids(choice: Mapping[str, Any]) -> list[int]:
    ids = choice.get("token_ids")
    if ids is None:
        raise ServerError(
            "the server returned no token ids for its answer (vLLM's return_token_ids)"
        )
    return [int(t) for t in ids]


def connect(
    spec: Any, tokenizer: Any, *, cache_dir: str | None = None, generation_eos: Any = None
) -> OpenAIBackend | ChatBackend:
    """The backend of a ``source: openai`` catalogue entry (a :class:`ModelSpec` whose
    ``served`` holds the entry's checked settings): the server checked first (it answers,
    it serves the model), the API key read from the variable ``api_key_env`` names.
    Answers are cached under ``cache_dir``, in a folder of their own for each (server,
    model, model root, server version). ``api: chat`` gives a :class:`ChatBackend` (its
    ``tokenizer`` is optional)."""
    served = spec.served
    if served is None:
        raise ValueError(f"model_catalogue: {spec.name} is not a served (source: openai) entry")
    api_key = None
    if served.api_key_env:
        api_key = os.environ.get(served.api_key_env)
        if not api_key:
            raise ServerError(
                f"model_catalogue: {spec.name}: the environment variable "
                f"{served.api_key_env} (api_key_env) is not set"
            )
    client = JsonClient(
        served.base_url,
        api_key=api_key,
        timeout=float(served.timeout),
        retries=served.retries,
        max_concurrency=served.max_concurrency,
    )
    info = server_info(client, served.served_model)
    if cache_dir:
        identity = ("served_model", "model_root", "server_version")
        fingerprint = request_key(client.base_url, {k: info.get(k) for k in identity})
        client.cache_dir = Path(cache_dir) / fingerprint[:16]
    if served.api == "chat":
        return ChatBackend(
            client,
            info,
            top_logprobs=served.top_logprobs,
            template_kwargs=spec.chat_template_kwargs,
            tokenizer=tokenizer,
        )
    return OpenAIBackend(client, tokenizer, info, generation_eos=generation_eos)
