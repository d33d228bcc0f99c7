"""A run's ``metrics.jsonl``: one JSON line per evaluation, written by rank 0 and read back by everyone.

An evaluation's event is ``epoch`` at an epoch's end (the default) and ``eval`` between
epoch ends (``train.eval_every_steps``, or the final validation where a budget stops a run).
The trainer ``emit``s each event to stdout (an orchestrator forwards it as it arrives) and
appends it to the file; on resume it ``truncate_after``s the step it resumes from, so a
redone stretch is written once. ``read_epochs`` is the one reader (tasks, flows, MLflow logging).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from pipeline import storage

METRICS_FILE = "metrics.jsonl"
EVALUATION_EVENTS = ("epoch", "eval")


def metrics_uri(run_dir: str) -> str:
    return storage.join(run_dir, METRICS_FILE)


def finite_or_none(x: float | None) -> float | None:
    """JSON has no inf/NaN: a figure that is not a finite float is reported as null."""
    return x if x is not None and math.isfinite(x) else None


def bits_per_token(ppl: float | None) -> float | None:
    """log2 of a perplexity: bits per character at char level, per word at word level
    (the unit character-level papers report). None stays None, inf stays inf."""
    return None if ppl is None else math.log2(ppl)


def with_bits(figures: dict) -> dict:
    """``figures`` with ``<x>_bits`` (``bits_per_token``) beside every ``<x>_ppl``."""
    out = {}
    for key, value in figures.items():
        out[key] = value
        if key.endswith("_ppl"):
            out[key.removesuffix("_ppl") + "_bits"] = bits_per_token(value)
    return out


def emit(uri: str, event: dict[str, Any]) -> None:
    """One JSON line (bits per token beside every perplexity) to the metrics file ``uri``, then to stdout.

    The file first: if whoever reads our stdout is gone (a killed launcher), the
    line is still recorded and training is not stopped by a broken pipe.
    """
    line = json.dumps(with_bits(event))
    if storage.is_local(uri):
        with open(storage.local_path(uri), "a", encoding="utf-8") as f:
            f.write(line + "\n")
    else:  # object stores cannot append
        old = storage.read_bytes(uri) if storage.exists(uri) else b""
        storage.write_bytes_atomic(uri, old + (line + "\n").encode())
    print_line(line)


def print_line(line: str) -> None:
    """``line`` to stdout; a closed stdout (the reader died) is dropped from then on, not an error."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (also keeps the exit-time flush quiet)


def truncate_after(uri: str, step: int) -> None:
    """Drop lines past ``step`` (the checkpoint we resume from): they will be trained again."""
    if not storage.exists(uri):
        return
    kept = [json.dumps(e) for e in _events(uri) if e.get("step", 0) <= step]
    storage.write_bytes_atomic(uri, "".join(ln + "\n" for ln in kept).encode())


def read_epochs(run_dir: str) -> list[dict[str, Any]]:
    """The evaluation events (``epoch``, ``eval``) of a run's ``metrics.jsonl`` (lines that are not
    JSON objects are skipped)."""
    uri = metrics_uri(run_dir)
    if not storage.exists(uri):
        return []
    return [e for e in _events(uri) if e.get("event") in EVALUATION_EVENTS]


def _events(uri: str) -> list[dict[str, Any]]:
    """The JSON-object lines of ``uri`` (anything else, e.g. a torn last line, is skipped)."""
    events = []
    for line in storage.read_bytes(uri).decode("utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events
