"""With no local copy of EmoEvalEs, the tests get it through the product's own download
(a local HTTP server stands in for the course's URL); offline, one message says what to
set."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO
from emoevales_copy import NoCopy, find_or_fetch


@pytest.fixture
def course_server(data_dir: Path):
    """A server of the course zip on this machine: (its URL, the paths asked for)."""
    body = (data_dir / "emoeval_data.zip").read_bytes()
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/download/emoeval_data.zip", asked
    httpd.shutdown()
    httpd.server_close()


def test_without_a_copy_the_data_is_downloaded_verified_and_cached_once(
    tmp_path, data_dir, course_server
):
    url, asked = course_server
    where = dict(given=None, beside=tmp_path / "none", cache=tmp_path / "cache",
                 config=REPO / "config.yaml", url=url)  # fmt: skip
    copy = find_or_fetch(**where)
    assert copy == tmp_path / "cache" and len(asked) == 1
    for name in ("emoeval_data.zip", "train.tsv", "dev.tsv"):
        assert (copy / name).read_bytes() == (data_dir / name).read_bytes(), name
    assert find_or_fetch(**where) == copy and len(asked) == 1  # cached: not asked again


def test_offline_with_no_copy_one_message_says_what_to_set(tmp_path):
    with pytest.raises(NoCopy) as caught:
        find_or_fetch(given=None, beside=tmp_path / "none", cache=tmp_path / "cache",
                      config=REPO / "config.yaml", url="http://127.0.0.1:9/x.zip")  # fmt: skip
    message = str(caught.value)
    assert "EMOEVALES_DIR" in message and "EMOEVALES_URL" in message
    assert not (tmp_path / "cache" / "emoeval_data.zip").exists()  # nothing half-written
    with pytest.raises(NoCopy, match=r"EMOEVALES_DIR=.* holds no emoeval_data\.zip"):
        find_or_fetch(given=str(tmp_path), beside=tmp_path, cache=tmp_path,
                      config=REPO / "config.yaml")  # fmt: skip


def test_a_data_test_runs_on_the_downloaded_copy_when_no_copy_is_given(tmp_path, course_server):
    url, asked = course_server
    env = {k: v for k, v in os.environ.items() if k != "EMOEVALES_DIR"}
    env |= {"EMOEVALES_LOCAL": str(tmp_path / "none"), "EMOEVALES_URL": url,
            "EMOEVALES_CACHE": str(tmp_path / "cache")}  # fmt: skip
    test = "tests/test_data.py::test_real_data_counts_and_sources_agree"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 passed" in result.stdout and len(asked) == 1
    assert (tmp_path / "cache" / "train.tsv").is_file()
