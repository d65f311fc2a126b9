"""The benchmark's vLLM cases: the backend of the server ``benchmarks/run.py`` started
for them, and emptying that server's prefix cache between timed passes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def reset_server_cache(backend) -> None:
    """Empty a vLLM server's prefix cache (its ``/reset_prefix_cache``, which the bench's
    server offers: ``VLLM_SERVER_DEV_MODE=1``), so that a timed pass does not reuse the
    prompts of the pass before."""
    from emoprompt.infra.http import JsonClient

    JsonClient(backend.client.base_url.removesuffix("/v1"), retries=0).post(
        "/reset_prefix_cache", {}
    )


def served_backend(entry: Mapping[str, Any], model_dir, server: str | None, concurrency: int):
    """The backend of the vLLM server that serves ``model_dir`` at ``server`` (no request
    cache: every pass asks), its tokenizer, and the dtype it serves in."""
    from emoprompt.inference.remote import OpenAIBackend, server_info
    from emoprompt.infra.http import JsonClient
    from emoprompt.models.loading import generation_eos, load_tokenizer

    if not server:
        raise ValueError("a vllm case needs the address of the server that serves the model")
    tokenizer = load_tokenizer(dict(entry), str(model_dir))
    client = JsonClient(server, max_concurrency=concurrency, timeout=300)
    served = client.get("/models")["data"][0]["id"]
    backend = OpenAIBackend(
        client, tokenizer, server_info(client, served), generation_eos=generation_eos(model_dir)
    )
    return backend, tokenizer, entry.get("dtype", "auto")
