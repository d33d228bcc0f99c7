"""What ``rnnlm`` shows: one line per event on the terminal, the whole story in a log file, a verdict last.

With a log file (``rnnlm run``), the terminal gets each record without its traceback (unless
``--verbose``) and the file gets everything; a failure ends with :func:`verdict`, one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from typing import Optional

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("rnnlm")


class WithoutTraceback(logging.Formatter):
    """A record's message without its traceback: the terminal's view when a log file has the whole."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def run_log_file(root: Optional[str]) -> str:
    """``<root>/logs/run-<UTC time>-<pid>.log`` for a local root, else the same under the temp dir."""
    from pipeline import storage

    store = storage.storage_root(root)
    base = storage.local_path(store) if storage.is_local(store) else os.path.join(tempfile.gettempdir(), "rnnlm")
    os.makedirs(os.path.join(base, "logs"), exist_ok=True)
    return os.path.join(base, "logs", f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log")


def configure_logging(verbose: bool, log_file: Optional[str] = None) -> None:
    """The terminal (stderr) gets INFO (DEBUG with --verbose); with a log file, the file gets
    every record in full and the terminal loses the tracebacks, unless --verbose."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(WithoutTraceback(LOG_FORMAT) if log_file and not verbose else logging.Formatter(LOG_FORMAT))
    root.addHandler(console)
    if log_file:
        file = logging.FileHandler(log_file, encoding="utf-8")
        file.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(file)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise


def _console_handlers() -> list[logging.StreamHandler]:
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def console_problems_only() -> None:
    """From now on the terminal shows warnings and errors only (e.g. not Prefect's "Stopping
    temporary server" at exit); a log file still gets everything."""
    for h in _console_handlers():
        h.setLevel(logging.WARNING)


@contextlib.contextmanager
def console_above_display():
    """While a live display holds the terminal: the terminal's log handlers show only warnings and
    errors, written through the current ``sys.stderr`` (the display's proxy, which prints above
    it); the log file still gets every record."""
    consoles = _console_handlers()
    saved = [(h, h.level, h.stream) for h in consoles]
    for h in consoles:
        h.setStream(sys.stderr)
        h.setLevel(max(h.level, logging.WARNING))
    try:
        yield
    finally:
        for h, level, stream in saved:
            h.setLevel(level)
            h.setStream(stream)


def verdict(message: str, args) -> None:
    """The last line: what failed, and where the whole story is. The traceback goes to the log
    file (and the terminal with --verbose); after this line the terminal gets nothing more without
    --verbose (Prefect's exit-time warnings, say, go to the log file only)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (message,), sys.exc_info())
    for h in logging.getLogger().handlers:
        if args.verbose or isinstance(h, logging.FileHandler):
            h.handle(record)
    for h in ([] if args.verbose else _console_handlers()):
        h.setLevel(logging.CRITICAL + 1)
    where = f" (full log: {args.log_file})" if args.log_file else ""
    print(f"rnnlm: error: {message}{where}", file=sys.stderr, flush=True)
