"""A server's chat-completions API as a backend (``api: chat``), against a real HTTP
server on 127.0.0.1 that answers as a hosted API does: the chat turns it is sent, its
top log-probabilities matched to the labels by text, tweets it cannot score, and label
likelihood refused. (Against a real vLLM: tests/test_vllm.py.)"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

from emoprompt.evaluation.runner import run_llm_strategy
from emoprompt.evaluation.strategies import STRATEGIES, Settings
from emoprompt.inference.remote import ChatBackend, connect, label_probs
from emoprompt.infra.http import ServerError
from emoprompt.labels import LABELS
from emoprompt.models.catalogue import Catalogue, CatalogueError
from emoprompt.models.spec import ModelSpec
from emoprompt.prompting.prompt_file import load_prompt_file
from emoprompt.prompting.render import chat_messages, render

MODEL = "hosted-model"


def top(*pairs):
    return [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in pairs]


# What the server's model answers for each tweet: its most likely first tokens, and text.
ANSWERS = {
    "qué alegría": (top(("Al", 0.5), (" alegría", 0.1), ("Tr", 0.2), ("**", 0.1)), "Alegría\nmás"),
    "qué rabia": (top(("Ira,", 0.6), ("S", 0.1), ("Des", 0.2)), "Ira"),
    "nada": (top(("**", 0.7), ("La", 0.2)), "**La** emoción"),
}


@pytest.fixture
def hosted():
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, payload, status=200):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":  # a hosted API: no root, no context length
                self._send({"data": [{"id": MODEL, "owned_by": "someone"}]})
            else:
                self._send({"error": {"message": "not found"}}, 404)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if self.path != "/v1/chat/completions":
                self._send({"error": {"message": f"no {self.path} here"}}, 404)
                return
            tops, text = ANSWERS[body["messages"][-1]["content"]]
            if body.get("max_completion_tokens") == 1:
                first = tops[0]["token"]
                logprobs = {"content": [{**tops[0], "top_logprobs": tops[: body["top_logprobs"]]}]}
                choice = {"message": {"content": first}, "logprobs": logprobs}
            else:
                content = text.split("\n")[0] if "\n" in body.get("stop", []) else text
                choice = {"message": {"role": "assistant", "content": content}, "logprobs": None}
            usage = {"prompt_tokens": 30, "completion_tokens": 3}
            self._send({"choices": [choice], "usage": usage, "model": MODEL})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
    httpd.shutdown()
    httpd.server_close()


def backend(url, tmp_path=None, **entry) -> ChatBackend:
    spec = ModelSpec.of(
        {"source": "openai", "api": "chat", "base_url": url, "served_model": MODEL,
         "prompt_format": "chat", **entry},
        name="hosted",
    )
    return connect(spec, None, cache_dir=str(tmp_path) if tmp_path else None)


def zero_shot_prompts(tweets):
    prompt = load_prompt_file("prompts/zero_shot.yaml", "zero_shot")
    return prompt, [render(prompt, t, None) for t in tweets]


def test_a_label_counts_the_tokens_that_start_it_and_no_other():
    labels = ["Alegría", "Ira", "Sorpresa", "Sorpresiva"]
    found = label_probs(top(("Al", 0.3), (" alegría", 0.1), ("Ira.", 0.2), ("Sorp", 0.2)), labels)
    # "Sorp" starts two labels: it counts for neither; "Ira." is the label then no letter.
    assert found == pytest.approx([0.4, 0.2, 0.0, 0.0])
    assert label_probs(top(("Iran", 0.5), ("", 0.2), ("**", 0.3)), labels).sum() == 0


def test_the_chat_turns_are_sent_and_first_token_scores_are_renormalised_over_the_labels(
    hosted,
):
    url, seen = hosted
    chat = backend(url, top_logprobs=3)
    prompt, parts = zero_shot_prompts(["qué alegría", "qué rabia", "nada"])
    probs = chat.first_token_probs(parts, prompt.labels)
    # the requests run concurrently: they may reach the server in any order
    first = [body for body in seen if body["messages"] == chat_messages(prompt, "qué alegría")]
    assert len(seen) == 3 and len(first) == 1
    assert first[0]["top_logprobs"] == 3 and first[0]["logprobs"] is True
    assert first[0]["temperature"] == 0.0 and "prompt" not in first[0]
    j = {label: prompt.labels.index(label) for label in prompt.labels}
    # Top 3 of the first tweet: Al 0.5, alegría 0.1, Tr 0.2 (the "**" is cut off).
    assert probs[0, j["Alegría"]] == pytest.approx(0.6 / 0.8)
    assert probs[0, j["Tristeza"]] == pytest.approx(0.2 / 0.8)
    assert probs[1, j["Ira"]] == pytest.approx(0.6 / 0.9)
    assert np.isnan(probs[2]).all()  # no label among its top tokens: not scored
    assert chat.stats["unscored"] == 1
    assert chat.stats["labels_absent"] == (7 - 2) + (7 - 3) + 7
    assert chat.describe()["unscored"] == 1 and chat.describe()["api"].startswith("chat")


def test_an_unscored_tweet_gets_the_fallback_label_and_counts_as_unparsed(hosted):
    url, _ = hosted
    prompt, _ = zero_shot_prompts([])
    sample = pd.DataFrame(
        {"id": ["a", "b", "c"], "tweet": ["qué alegría", "qué rabia", "nada"], "label": LABELS[:3]}
    )
    result = run_llm_strategy(
        STRATEGIES["zero_shot_first_token"], backend(url), None, prompt, sample, sample, Settings()
    )
    assert list(result.predictions["predicted"]) == ["Alegría", "Ira", "Otras"]
    assert list(result.predictions["parsed"]) == [True, True, False]
    assert result.metadata["unparsed"] == 1
    assert result.predictions.filter(like="p_").iloc[2].isna().all()
    assert result.predictions.filter(like="p_").iloc[:2].sum(axis=1).to_numpy() == pytest.approx(1)


def test_generation_sends_the_decoding_and_cuts_at_the_newline(hosted, tmp_path):
    url, seen = hosted
    chat = backend(url, tmp_path)
    _, parts = zero_shot_prompts(["qué alegría"])
    greedy = chat.generate(parts, max_new_tokens=5)
    assert greedy[0].text == "Alegría\nmás" and greedy[0].tokens_out == 3
    assert seen[-1]["max_completion_tokens"] == 5 and "seed" not in seen[-1]
    sampled = chat.generate(parts, do_sample=True, temperature=0.7, seed=3, stop_at_newline=True)
    assert sampled[0].text == "Alegría"
    assert (seen[-1]["temperature"], seen[-1]["seed"], seen[-1]["stop"]) == (0.7, 3, ["\n"])
    sent = len(seen)
    assert chat.generate(parts, max_new_tokens=5)[0].text == greedy[0].text
    assert len(seen) == sent  # answered by the request cache


def test_label_likelihood_is_refused_with_the_reason_before_any_request(hosted):
    url, seen = hosted
    prompt, parts = zero_shot_prompts(["nada"])
    with pytest.raises(ServerError, match="chat-completions API does not return"):
        backend(url).label_logprobs(parts, prompt.labels)
    assert seen == []


def test_an_entry_without_a_tokenizer_needs_the_chat_api(hosted):
    url, _ = hosted
    entry = {"source": "openai", "base_url": url, "served_model": MODEL, "prompt_format": "chat"}
    with pytest.raises(CatalogueError, match=r"x is served .* needs tokenizer"):
        Catalogue({"x": entry})
    with pytest.raises(CatalogueError, match=r"x: api = 'grpc': Input should be 'completions'"):
        Catalogue({"x": {**entry, "api": "grpc"}})
    plain = load_prompt_file("prompts/finetuned.yaml", "finetuned")
    with pytest.raises(ValueError, match="plain prompts"):
        backend(url).generate([render(plain, "nada")])
