"""Leases: a running flow says what in the store it is using, so ``rnnlm gc`` keeps it.

A lease is one small JSON file, ``<root>/leases/<id>.json``, written by the retrain flow when it
starts and removed when it ends::

    {"holder": "host:pid", "flow_run_id": ..., "since": <unix time>, "datasets": [...], "runs": [...]}

While it is live, gc keeps the datasets and run directories it names, and anything written since
``since`` (what the flow may be writing right now, before it knows its dataset's id). Plain files
work on a local root and on object stores alike. A lease whose holder was a process on this host
that is gone, or older than ``RetentionConfig.lease_max_age_hours``, is stale: gc ignores and
sweeps it. A lease that cannot be read stops gc (fail closed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

from pipeline import storage
from pipeline.errors import StorageError

log = logging.getLogger(__name__)

LEASES = "leases"


@dataclass
class Lease:
    uri: str | None  # None: the root could not be written (a read-only store: nothing to protect from gc here)
    holder: str
    since: float
    flow_run_id: str | None = None
    datasets: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"holder": self.holder, "since": self.since, "flow_run_id": self.flow_run_id,
                "datasets": sorted(set(self.datasets)), "runs": sorted(set(self.runs))}

    def add(self, *, datasets: tuple[str, ...] = (), runs: tuple[str, ...] = ()) -> None:
        """Name more things this flow uses (written at once)."""
        self.datasets += [d for d in datasets if d]
        self.runs += [r for r in runs if r]
        if self.uri is not None:
            storage.write_json_atomic(self.uri, self.to_dict())

    def is_stale(self, now: float, max_age_s: float) -> bool:
        host, _, pid = self.holder.partition(":")
        if host == socket.gethostname() and pid.isdigit():
            import psutil

            if not psutil.pid_exists(int(pid)):
                return True
        return now - self.since > max_age_s


@contextlib.contextmanager
def leased(root: str, flow_run_id: str | None = None) -> Iterator[Lease]:
    """Hold a lease under ``root`` for the block; ``lease.add(datasets=..., runs=...)`` names what is used."""
    uri = storage.join(root, LEASES, f"{uuid.uuid4().hex}.json")
    lease = Lease(uri, f"{socket.gethostname()}:{os.getpid()}", time.time(), flow_run_id)
    try:
        storage.write_json_atomic(uri, lease.to_dict())
    except OSError as e:
        if not storage.is_unwritable(e):
            raise
        log.warning("cannot write a lease under %s (%s): a gc running meanwhile cannot see this flow", root, e)
        lease.uri = None
    try:
        yield lease
    finally:
        if lease.uri is not None:
            with contextlib.suppress(FileNotFoundError):
                fs, path = storage.filesystem(lease.uri)
                fs.rm(path)


def read_leases(root: str) -> list[Lease]:
    """Every lease under ``root``; one that cannot be read raises ``StorageError`` (never "absent")."""
    fs, path = storage.filesystem(storage.join(root, LEASES))
    if not fs.exists(path):
        return []
    out = []
    for entry in sorted(fs.ls(path, detail=False)):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.endswith(".json"):
            continue  # a write in progress (``*.json.tmp-*``)
        uri = storage.join(root, LEASES, name)
        try:
            raw = storage.read_json(uri)
            out.append(Lease(uri, str(raw["holder"]), float(raw["since"]), raw.get("flow_run_id"),
                             list(raw.get("datasets") or []), list(raw.get("runs") or [])))
        except FileNotFoundError:
            continue  # released since the listing
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StorageError(uri, f"lease unreadable ({type(e).__name__}: {e}); gc deletes nothing "
                                    f"until it is fixed or removed") from e
    return out
