"""Shared fixtures. Every test runs with ``$RNNLM_STORAGE`` pointing at its own temp dir,
so nothing ever lands in ``./.rnnlm``."""

from __future__ import annotations

import functools
import http.server
import threading
from importlib import resources
from pathlib import Path

import pytest

from pipeline.storage import ENV_STORAGE


@pytest.fixture(autouse=True)
def _isolated_storage(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_STORAGE, str(tmp_path / "store"))


@pytest.fixture
def store(tmp_path) -> str:
    """The artifact root of this test (the same one ``$RNNLM_STORAGE`` names)."""
    return str(tmp_path / "store")


@pytest.fixture(scope="session")
def timemachine_text() -> str:
    """The bundled d2l corpus, as text."""
    return (resources.files("pipeline") / "data" / "timemachine.txt").read_text(encoding="utf-8")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a fresh directory: yields ``(directory, base_url)``."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Path(root), f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
