"""Progress events: how a long stage tells whoever shows it how far it has got, in this process.

A stage ``publish``es small dicts (``{"event": "progress", "stage": "prepare", ...}``); a
display subscribes for as long as it shows them (``listening``). Nobody listening (a worker,
a test, a library caller) costs one empty loop per event. The trainer runs in a child
process: it prints its events as JSON lines on stdout (``pipeline.training.progress``)
and the launcher publishes them here (``pipeline.training.launch``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any]], None]
_listeners: list[Listener] = []

# The launcher sets this in the trainer's environment: rank 0 then prints a progress line at most
# this often (seconds). Unset, a trainer started by hand prints none.
EVERY_S_ENV = "RNNLM_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 0.5


def publish(event: dict[str, Any]) -> None:
    """Hand ``event`` to every listener; a failing display never stops the stage it shows."""
    for listener in tuple(_listeners):
        try:
            listener(event)
        except Exception:
            log.debug("progress listener failed on %s", event, exc_info=True)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send every published event to ``listener`` while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
