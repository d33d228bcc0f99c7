"""Retry rules: retry only what trying again can fix, and nothing while the process is stopping."""

from __future__ import annotations

import threading
from typing import Any

from pipeline import storage
from pipeline.errors import PipelineError
from tasks.caching import run_logger

terminating = threading.Event()  # set when the process is being stopped: retrying is pointless


def failure_of(state) -> BaseException | None:
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # noqa: BLE001
        return e
    return exc if isinstance(exc, BaseException) else None


PERMANENT_OS_ERRORS = storage.PERMANENT_OS_ERRORS
# Transient errors of object-store and HTTP clients that are not OSErrors (botocore, aiohttp), by class name
# so that no client library needs to be importable here.
TRANSIENT_CLIENT_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                           "ConnectionClosedError", "ClientConnectionError", "ServerTimeoutError",
                           "ServerDisconnectedError"}
# Error codes an object store answers when asking again later can succeed.
TRANSIENT_STORE_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
                         "ThrottlingException", "RequestLimitExceeded", "500", "502", "503", "504"}


def is_retryable(exc: BaseException | None) -> bool:
    """PipelineErrors say so themselves; network and object-store hiccups may pass; a missing
    or unreadable input, an object store's permanent refusal (invalid bucket, access denied),
    a full disk (it stays full until someone frees space) and bugs do not."""
    if terminating.is_set() or exc is None:
        return False
    if isinstance(exc, PipelineError):
        return bool(exc.retryable)
    if storage.fails_every_time(exc) or storage.is_disk_full(exc):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    code = ((getattr(exc, "response", None) or {}).get("Error") or {}).get("Code")  # botocore ClientError
    if code is not None:
        return str(code) in TRANSIENT_STORE_CODES
    return bool({c.__name__ for c in type(exc).__mro__} & TRANSIENT_CLIENT_ERRORS)


def retry_if_retryable(task, task_run, state) -> bool:
    """``retry_condition_fn`` for every retried task: only errors that trying again can fix."""
    exc = failure_of(state)
    ok = is_retryable(exc)
    if not ok and exc is not None:
        # the same words as rnnlm's last line (flows.cli), so that the log and the verdict agree
        reason = ("stopping" if terminating.is_set() else "retrying cannot fix this" if storage.fails_every_time(exc)
                  else "unexpected, so not retried")
        run_logger().error("%s: %s: %s: not retrying (%s)", task.name, type(exc).__name__, exc, reason)
    return ok


def backoff_options(retries: int, first_delay_s: float) -> dict[str, Any]:
    """Task options: exponential backoff with jitter, on retryable errors only (never a checksum mismatch)."""
    delays = [first_delay_s * 2**i for i in range(retries)]
    return {"retries": retries, "retry_delay_seconds": delays or 0, "retry_jitter_factor": 0.5,
            "retry_condition_fn": retry_if_retryable}
