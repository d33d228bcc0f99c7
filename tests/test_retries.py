"""Retry rules (tasks/retries.py): retry only what trying again can fix."""

from __future__ import annotations

import errno
import tomllib
from pathlib import Path

import aiohttp
import pytest
from packaging.requirements import Requirement

from pipeline.errors import CorpusError, SourceUnreachableError
from tasks.retries import is_retryable

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("exc", [
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/corpus.txt"),
    PermissionError(errno.EACCES, "Permission denied", "/data/corpus.txt"),
    IsADirectoryError(errno.EISDIR, "Is a directory", "/data"),
    NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/corpus.txt/x"),
    CorpusError("/data/corpus.txt", "checksum mismatch"),
    KeyError("bug"),
])
def test_what_retrying_cannot_fix_is_not_retried(exc):
    assert not is_retryable(exc)


@pytest.mark.parametrize("exc", [
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    TimeoutError("read timed out"),
    OSError(errno.EIO, "I/O error"),
    SourceUnreachableError("http://example.invalid/x", "unreachable"),
    aiohttp.ServerDisconnectedError(),
    aiohttp.ClientConnectionError("connection refused"),
])
def test_network_and_store_hiccups_are_retried(exc):
    assert is_retryable(exc)


@pytest.mark.parametrize("exc", [
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/corpus.txt"),
    PermissionError(errno.EACCES, "Permission denied", "/data/corpus.txt"),
    CorpusError("/data/corpus.txt", "checksum mismatch"),
    KeyError("bug"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    SourceUnreachableError("http://example.invalid/x", "unreachable"),
])
def test_rnnlm_last_line_agrees_with_what_the_flow_did(exc):
    """What `rnnlm run` says last (exit code, words) agrees with the retry rule its tasks followed:
    'retrying cannot fix this' (exit 3) only for what fails every time, 'not retried' for what was
    not, and never 'retrying may help' for an error the tasks refused to retry as hopeless."""
    from flows.cli import failure_kind
    from pipeline import storage

    if storage.fails_every_time(exc):
        assert not is_retryable(exc)  # the log says "not retrying (retrying cannot fix this)"; so does the line
    elif is_retryable(exc):
        assert failure_kind(exc) == "retrying may help"
    else:  # an unexpected error: not retried, and the line says so
        assert "not retried" in failure_kind(exc)


def test_pyproject_torch_lower_bound_has_the_apis_the_trainer_calls():
    assert any("get_total_norm" in p.read_text() for p in (REPO / "pipeline").rglob("*.py"))  # new in torch 2.6
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert not torch.specifier.contains("2.5.1") and torch.specifier.contains("2.6.0")
