"""Shared fixtures. Every test runs with ``$RNNLM_STORAGE`` (and ``$RNNLM_SPLIT_CACHE``) pointing
at its own temp dir, so nothing ever lands in ``./.rnnlm`` (or ``~/.cache``)."""

from __future__ import annotations

import functools
import os
import http.server
import threading
from importlib import resources
from pathlib import Path

import pytest

from pipeline.storage import ENV_STORAGE


@pytest.fixture(autouse=True)
def _isolated_storage(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_STORAGE, str(tmp_path / "store"))
    monkeypatch.setenv("RNNLM_SPLIT_CACHE", str(tmp_path / "split-cache"))  # not ~/.cache


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


# ------------------------------------------------------------- servers (tests/servers.py)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 API on 127.0.0.1 for the whole session (each test takes a fresh bucket)."""
    from tests.servers import Processes, start_s3

    procs = Processes(tmp_path_factory.mktemp("s3-server"))
    try:
        yield start_s3(procs)
    finally:
        procs.stop_all()


@pytest.fixture
def s3_root(s3_server, monkeypatch) -> str:
    """A fresh bucket on the test S3 server, with this process (and its children) pointed at the
    server through the environment; returns ``s3://<bucket>/rnnlm``."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server.new_bucket() + "/rnnlm"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A real ``redis-server`` on 127.0.0.1 for the session."""
    from tests.servers import Processes, start_redis

    base = tmp_path_factory.mktemp("redis")
    procs = Processes(base / "logs")
    try:
        yield start_redis(procs, base / "data")
    finally:
        procs.stop_all()


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory) -> str:
    """A throwaway PostgreSQL cluster on 127.0.0.1 for the session: its asyncpg URL."""
    import shutil

    from tests.servers import Processes, start_postgres

    procs = Processes(tmp_path_factory.mktemp("postgres-logs"))
    directory = None
    try:
        url, directory = start_postgres(procs)
        yield url
    finally:
        procs.stop_all()
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


def pytest_runtest_makereport(item, call):
    """Under CI (``CI=true``) a test that needs a server dependency must run: its skip
    ("missing test dependency: ... apt-get install ...", tests/servers.py) is a failure.
    Other skips (no CUDA) stay skips."""
    if call.when != "setup" and call.when != "call":
        return None
    if os.environ.get("CI", "").lower() != "true" or call.excinfo is None:
        return None
    from tests.servers import MISSING

    if call.excinfo.errisinstance(pytest.skip.Exception) and str(call.excinfo.value).startswith(MISSING):
        from _pytest.reports import TestReport

        report = TestReport.from_item_and_call(item, call)
        report.outcome = "failed"
        report.longrepr = f"CI=true, but {call.excinfo.value}"
        return report
    return None
