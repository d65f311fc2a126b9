"""The model-server client against a real HTTP server on 127.0.0.1 that misbehaves on cue:
down, slow, failing, then answering; and its request cache."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from emoprompt.infra.http import JsonClient, ServerError, request_key


class Script:
    """What the server answers: a list of (status, delay) per request, then 200."""

    def __init__(self) -> None:
        self.plan: list[tuple[int, float]] = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0


@pytest.fixture
def server():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _answer(self, body):
            with script.lock:
                script.requests.append(body)
                script.headers.append(dict(self.headers))
                status, delay = script.plan.pop(0) if script.plan else (200, 0.0)
                script.in_flight += 1
                script.most_in_flight = max(script.most_in_flight, script.in_flight)
            time.sleep(delay)
            with script.lock:
                script.in_flight -= 1
            if status == 200:
                payload = {"echo": body, "n": len(script.requests)}
            else:
                payload = {"error": {"message": f"scripted failure {status}"}}
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            self._answer(json.loads(self.rfile.read(length)))

        def do_GET(self):
            self._answer({"path": self.path})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    script.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield script
    httpd.shutdown()
    httpd.server_close()


def client(url, **kwargs):
    waits: list[float] = []
    c = JsonClient(url, backoff=0.5, sleep=waits.append, **kwargs)
    c.waits = waits
    return c


def test_500_twice_then_200_recovers_with_backoff(server):
    server.plan = [(500, 0.0), (503, 0.0)]
    c = client(server.url, retries=3)
    answer = c.post("/completions", {"prompt": [1, 2]})
    assert answer["echo"] == {"prompt": [1, 2]}
    assert len(server.requests) == 3
    assert c.waits == [0.5, 1.0]  # exponential backoff
    assert c.stats["retried"] == 2


def test_a_request_that_keeps_failing_names_the_server_and_the_status(server):
    server.plan = [(500, 0.0)] * 5
    c = client(server.url, retries=2)
    with pytest.raises(ServerError, match=r"HTTP 500: scripted failure 500 \(after 3 tries\)"):
        c.post("/completions", {"prompt": [1]})
    assert len(server.requests) == 3


def test_a_client_error_is_not_retried_and_shows_the_servers_message(server):
    server.plan = [(400, 0.0)]
    c = client(server.url, retries=3)
    with pytest.raises(ServerError, match="HTTP 400: scripted failure 400"):
        c.post("/completions", {"prompt": [1]})
    assert len(server.requests) == 1


def test_a_slow_server_times_out_then_recovers(server):
    server.plan = [(200, 2.0)]
    c = client(server.url, timeout=0.5, retries=1)
    assert c.post("/completions", {"prompt": [3]})["echo"] == {"prompt": [3]}
    assert c.stats["retried"] == 1
    server.plan = [(200, 2.0), (200, 2.0)]
    with pytest.raises(ServerError, match=r"no answer within 0.5 s \(after 2 tries\)"):
        c.post("/completions", {"prompt": [4]})


def test_a_server_that_is_down_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = client(f"http://127.0.0.1:{port}/v1", retries=2)
    with pytest.raises(ServerError, match=rf"127.0.0.1:{port}/v1/models: cannot connect"):
        c.get("/models")
    assert c.waits == [0.5, 1.0]


def test_the_cache_answers_a_rerun_without_a_request_and_never_stores_the_key(server, tmp_path):
    c = client(server.url, cache_dir=tmp_path, api_key="sk-secret-123")
    bodies = [{"prompt": [i]} for i in range(6)]
    first = c.post_many("/completions", bodies)
    assert len(server.requests) == 6
    assert server.headers[0]["Authorization"] == "Bearer sk-secret-123"
    again = client(server.url, cache_dir=tmp_path, api_key="sk-secret-123")
    assert again.post_many("/completions", bodies) == first
    assert len(server.requests) == 6  # no request sent
    assert again.stats["cached"] == 6 and again.stats["requests"] == 0
    stored = "".join(p.read_text() for p in tmp_path.rglob("*.json"))
    assert "sk-secret" not in stored and "sk-secret" not in repr(again)
    key = request_key(server.url + "/completions", bodies[0])
    assert (tmp_path / key[:2] / f"{key}.json").exists()


def test_a_job_that_fails_part_way_keeps_what_it_got(server, tmp_path):
    bodies = [{"prompt": [i]} for i in range(5)]
    # One request fails for good (400); the other four are answered and cached.
    server.plan = [(200, 0.0), (200, 0.0), (400, 0.0)]
    c = client(server.url, cache_dir=tmp_path, max_concurrency=1)
    with pytest.raises(ServerError, match="HTTP 400"):
        c.post_many("/completions", bodies)
    assert len(list(tmp_path.rglob("*.json"))) == 4
    sent = len(server.requests)
    rerun = client(server.url, cache_dir=tmp_path, max_concurrency=1)
    answers = rerun.post_many("/completions", bodies)
    assert [a["echo"] for a in answers] == bodies
    assert len(server.requests) == sent + 1  # only the one that had failed


def test_requests_run_concurrently_within_the_bound(server):
    server.plan = [(200, 0.3)] * 12
    c = client(server.url, max_concurrency=4)
    answers = c.post_many("/completions", [{"prompt": [i]} for i in range(12)])
    assert [a["echo"]["prompt"] for a in answers] == [[i] for i in range(12)]  # in order
    assert 2 <= server.most_in_flight <= 4
