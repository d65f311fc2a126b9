"""The real download path against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from emoprompt.data.download import DownloadError, fetch, folder_digest, redact, source_kind


class Server:
    """Serves fixed routes; counts requests per path."""

    def __init__(self, routes: dict[str, tuple[int, bytes, dict[str, str]]]) -> None:
        self.routes = routes
        self.hits: dict[str, int] = {}
        self.flaky_failures = 1
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                if self.path == "/flaky.zip" and server.hits[self.path] <= server.flaky_failures:
                    self.send_error(503, "busy")
                    return
                status, body, headers = server.routes.get(self.path, (404, b"not found", {}))
                self.send_response(status)
                headers = {"Content-Length": str(len(body)), **headers}
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def zip_without_splits() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    return buffer.getvalue()


@pytest.fixture
def server(data_dir: Path) -> Iterator[Server]:
    body = (data_dir / "emoeval_data.zip").read_bytes()
    routes = {
        "/emoeval_data.zip": (200, body, {}),
        "/flaky.zip": (200, body, {}),
        # Announces the full size, sends half, then the connection closes.
        "/truncated.zip": (200, body[: len(body) // 2], {"Content-Length": str(len(body))}),
        "/page.html": (200, b"<html>login</html>", {}),
        "/empty.zip": (200, zip_without_splits(), {}),
    }
    with Server(routes) as srv:
        yield srv


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_succeeds_and_verifies(server: Server, data_dir: Path, tmp_path: Path):
    dest = tmp_path / "raw" / "emoeval_data.zip"
    expected = sha_of(data_dir / "emoeval_data.zip")
    prov = fetch(f"{server.url}/emoeval_data.zip", dest, sha256=expected.upper())
    assert dest.read_bytes() == (data_dir / "emoeval_data.zip").read_bytes()
    assert prov.sha256 == expected and prov.checksum_verified and prov.kind == "url"
    assert list(dest.parent.iterdir()) == [dest]  # no temporary file left behind


def test_wrong_checksum_fails_clearly_and_leaves_nothing(server: Server, tmp_path: Path):
    dest = tmp_path / "raw" / "emoeval_data.zip"
    with pytest.raises(DownloadError, match=r"checksum mismatch .* expected sha256 0{64}, got"):
        fetch(f"{server.url}/emoeval_data.zip", dest, sha256="0" * 64, retries=0)
    assert list(dest.parent.iterdir()) == []


def test_http_404_fails_at_once_without_retrying(server: Server, tmp_path: Path):
    dest = tmp_path / "emoeval_data.zip"
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server.url}/gone.zip", dest, retries=3, backoff=0.01)
    assert server.hits["/gone.zip"] == 1
    assert list(tmp_path.iterdir()) == []


def test_truncated_response_is_retried_then_refused(server: Server, tmp_path: Path):
    dest = tmp_path / "emoeval_data.zip"
    with pytest.raises(DownloadError, match="after 3 attempts"):
        fetch(f"{server.url}/truncated.zip", dest, retries=2, backoff=0.01)
    assert server.hits["/truncated.zip"] == 3
    assert list(tmp_path.iterdir()) == []


def test_transient_server_error_is_retried(server: Server, data_dir: Path, tmp_path: Path):
    dest = tmp_path / "emoeval_data.zip"
    fetch(f"{server.url}/flaky.zip", dest, retries=2, backoff=0.01)
    assert server.hits["/flaky.zip"] == 2
    assert sha_of(dest) == sha_of(data_dir / "emoeval_data.zip")


@pytest.mark.parametrize(
    ("path", "message"),
    [("/page.html", "is not a zip archive"), ("/empty.zip", "no train split")],
)
def test_content_that_is_not_the_data_is_refused(server: Server, tmp_path: Path, path, message):
    dest = tmp_path / "emoeval_data.zip"
    with pytest.raises(DownloadError, match=message):
        fetch(f"{server.url}{path}", dest, retries=0)
    assert list(tmp_path.iterdir()) == []


def test_local_zip_and_folder_sources(data_dir: Path, tmp_path: Path):
    prov = fetch(str(data_dir / "emoeval_data.zip"), tmp_path / "a.zip")
    assert prov.kind == "zip" and not prov.checksum_verified
    folder = fetch(str(data_dir), tmp_path / "raw")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["dev.tsv", "train.tsv"]
    assert folder.sha256 == folder_digest(folder.files)
    assert folder.files["dev.tsv"] == sha_of(data_dir / "dev.tsv")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(str(data_dir), tmp_path / "raw2", sha256="f" * 64)
    assert not (tmp_path / "raw2").exists()


def test_source_kinds_and_redaction(tmp_path: Path):
    assert source_kind("https://example.org/x.zip") == "url"
    assert source_kind(str(tmp_path)) == "folder"
    with pytest.raises(DownloadError, match="no such file or folder"):
        source_kind(str(tmp_path / "missing.zip"))
    with pytest.raises(DownloadError, match="only http"):
        source_kind("ftp://example.org/x.zip")
    assert redact("https://user:secret@host:8443/a/b.zip?token=abc") == "https://host:8443/a/b.zip"
