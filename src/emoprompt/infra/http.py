"""JSON over HTTP for model servers: bounded concurrency, timeouts, retries, a cache.

:class:`JsonClient` posts JSON requests to one server (an OpenAI-compatible API such as
``vllm serve``):

* at most ``max_concurrency`` requests are in flight at once;
* each waits at most ``timeout`` seconds; a connection error, a timeout, a 429 or a 5xx
  answer is tried again up to ``retries`` times, waiting ``backoff * 2**k`` seconds (or
  the server's ``Retry-After``) in between; any other answer is an error at once, with
  the server's own message;
* with a ``cache_dir``, every answer is written there (one file per request, atomically)
  as soon as it arrives, keyed by the sha256 of the full request (address and body; the
  API key is not part of it and is never written): a re-run, or the re-run of a job that
  failed part-way, sends only the requests that have no answer yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import requests
from tqdm.auto import tqdm

from emoprompt.infra.errors import UserError
from emoprompt.infra.files import write_json

log = logging.getLogger(__name__)

#: Answers worth trying again: too many requests, and the server's own failures.
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class ServerError(UserError, RuntimeError):
    """A server that cannot be reached, does not answer in time, or refuses a request."""


def request_key(url: str, body: Mapping[str, Any]) -> str:
    """The cache key of a request: sha256 of its address and canonical JSON body."""
    canonical = json.dumps({"url": url, "body": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class JsonClient:
    """One server's JSON API (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 1.0,
        max_concurrency: int = 8,
        cache_dir: str | Path | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_concurrency = max_concurrency
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._sleep = sleep
        self._local = threading.local()
        self._lock = threading.Lock()
        self.stats: Counter = Counter(requests=0, cached=0, retried=0)

    def __repr__(self) -> str:  # never shows the key
        return f"JsonClient({self.base_url!r})"

    # ------------------------------------------------------------------ requests
    def get(self, path: str) -> Any:
        """A GET answer (not cached: what the server says about itself)."""
        return self._send("GET", path, None)

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        """A POST answer, from the cache where the same request was answered before."""
        url = self.base_url + path
        key = request_key(url, body)
        cached = self._cached(key)
        if cached is not None:
            with self._lock:
                self.stats["cached"] += 1
            return cached
        answer = self._send("POST", path, body)
        if self.cache_dir is not None:
            write_json(self._cache_file(key), {"url": url, "body": body, "answer": answer})
        return answer

    def post_many(
        self, path: str, bodies: Sequence[Mapping[str, Any]], *, desc: str = "requests"
    ) -> list[Any]:
        """Each body's answer, in order, at most ``max_concurrency`` in flight.

        Answers are cached as they arrive; when one request fails for good, the others
        still finish (and are cached) before the error is raised."""
        out: list[Any] = [None] * len(bodies)
        failure: ServerError | None = None
        with (
            ThreadPoolExecutor(max_workers=self.max_concurrency) as pool,
            tqdm(total=len(bodies), desc=desc, unit="request") as bar,
        ):
            futures = {pool.submit(self.post, path, body): i for i, body in enumerate(bodies)}
            for future in as_completed(futures):
                try:
                    out[futures[future]] = future.result()
                except ServerError as error:
                    failure = failure or error
                bar.update()
        if failure is not None:
            raise failure
        return out

    # ------------------------------------------------------------------ internals
    def _cache_file(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cached(self, key: str) -> Any | None:
        if self.cache_dir is None:
            return None
        path = self._cache_file(key)
        if not path.exists():
            return None
        return json.loads(path.read_text(encoding="utf-8"))["answer"]

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _send(self, method: str, path: str, body: Mapping[str, Any] | None) -> Any:
        url = self.base_url + path
        for attempt in range(self.retries + 1):
            if method == "POST":  # what the server was asked to compute (GETs: about itself)
                with self._lock:
                    self.stats["requests"] += 1
            result, problem = self._try_once(method, url, body)
            if problem is None:
                return result
            if attempt == self.retries:
                raise ServerError(
                    f"{method} {url}: {problem} (after {self.retries + 1} tries); is the server "
                    "running and serving this model? (docs/serving.md: Setting up vLLM)"
                )
            delay = self.backoff * 2**attempt if result is None else result
            log.warning("%s %s: %s; trying again in %.1f s", method, url, problem, delay)
            with self._lock:
                self.stats["retried"] += 1
            self._sleep(delay)
        raise AssertionError("unreachable")

    def _try_once(self, method: str, url: str, body: Mapping[str, Any] | None):
        """(answer, None) on success; (seconds to wait or None, problem) for a retry."""
        try:
            response = self._session().request(
                method, url, json=body, headers=self._headers, timeout=self.timeout
            )
        except requests.Timeout:
            return None, f"no answer within {self.timeout:g} s"
        except requests.ConnectionError as error:
            return None, f"cannot connect ({type(error).__name__})"
        if response.status_code in RETRY_STATUS:
            return _retry_after(response), f"HTTP {response.status_code}: {_message(response)}"
        if response.status_code >= 400:
            raise ServerError(f"{method} {url}: HTTP {response.status_code}: {_message(response)}")
        try:
            return response.json(), None
        except ValueError as error:
            raise ServerError(f"{method} {url}: the answer is not JSON ({error})") from error


def _message(response: requests.Response) -> str:
    """The server's error message (OpenAI-style ``{"error": {"message": ...}}``) or text."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300] or response.reason or "no message"
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str(error)[:300]


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return min(float(value), 60.0) if value is not None else None
    except ValueError:
        return None
