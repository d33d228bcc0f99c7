"""What a storage root holds: datasets, run directories, registered versions, and the rest.

``take_inventory(root)`` lists the root once (one recursive listing, also on S3) and reads the few
small files that say what references what: each dataset's ``manifest.json`` (its corpus
sources), each run directory's ``lm.json`` (its dataset) and ``result.json`` / ``FAILED.json``
(its state), the leases, and the registry (version -> MLflow run -> run directory -> dataset).
Anything it cannot read raises: an inventory is never partial, so gc never mistakes "could
not read" for "not needed".
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field

from pipeline import storage
from pipeline.data.shards import MANIFEST
from pipeline.errors import DatasetError, StorageError
from pipeline.registry.cleanup import Version, registered_versions
from pipeline.store.leases import Lease, read_leases
from pipeline.training.launch import LOCK_FILE

CHECKPOINTS = "checkpoints"
STAGING = re.compile(r"\.tmp-[0-9a-f]+$")
QUARANTINED = re.compile(r"\.\d{8}T\d{6}Z-[0-9a-f]{6}$")  # pipeline.storage.quarantine's suffix
SWEPT_DIRS = ("corpus", "datasets", "runs", "work")  # where staging names are swept


@dataclass
class Item:
    """One thing in the root: its URI, bytes, and newest modification time (unix seconds)."""

    kind: str  # dataset, run, corpus, work, staging, quarantine, lease
    id: str
    uri: str
    bytes: int = 0
    mtime: float = 0.0
    files: list[tuple[str, int]] = field(default_factory=list, repr=False)  # (path under root, bytes)
    refs: dict = field(default_factory=dict)  # what it references: dataset, sources, state...

    def age_h(self, now: float) -> float:
        return max(0.0, now - self.mtime) / 3600

    def to_dict(self, now: float) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "files"}
        d["age_h"] = round(self.age_h(now), 3)
        return d


@dataclass
class Inventory:
    root: str
    now: float
    datasets: dict[str, Item]
    runs: dict[str, Item]
    versions: list[Version]
    leases: list[Lease]
    other: list[Item]  # corpus copies, work/ outputs, staging, quarantine
    stage_locks: list[str]  # held Prefect stage locks (local roots): a data stage is running
    totals: dict[str, int]  # bytes by top-level entry of the root

    @property
    def bytes(self) -> int:
        return sum(self.totals.values())

    def to_dict(self) -> dict:
        return {"root": self.root, "bytes": self.bytes, "totals": self.totals,
                "versions": [v.to_dict() for v in self.versions],
                "runs": [r.to_dict(self.now) for r in self.runs.values()],
                "datasets": [d.to_dict(self.now) for d in self.datasets.values()],
                "other": [o.to_dict(self.now) for o in self.other],
                "leases": [{"uri": le.uri, **le.to_dict()} for le in self.leases],
                "stage_locks": self.stage_locks}


def _mtime(info: dict) -> float:
    t = info.get("mtime", info.get("LastModified", info.get("last_modified", 0)))
    if isinstance(t, datetime.datetime):
        return t.timestamp()
    return float(t or 0)


def list_files(root: str) -> dict[str, tuple[int, float]]:
    """``{path under root: (bytes, mtime)}`` of every file under ``root``."""
    fs, base = storage.filesystem(root)
    if not fs.exists(base):
        return {}
    sep = "/" if "://" in root else os.sep
    out = {}
    for path, info in fs.find(base, detail=True).items():
        if info.get("type") == "directory":
            continue
        rel = path[len(base):].lstrip("/").lstrip(sep).replace(os.sep, "/")
        out[rel] = (int(info.get("size") or 0), _mtime(info))
    return out


def _group(files: dict[str, tuple[int, float]], root: str) -> tuple[dict[str, Item], dict[str, int]]:
    """Files grouped into items by where they sit; bytes per top-level entry."""
    items: dict[str, Item] = {}
    totals: dict[str, int] = {}
    for rel, (size, mtime) in files.items():
        parts = rel.split("/")
        totals[parts[0]] = totals.get(parts[0], 0) + size
        key = _item_key(parts)
        if key is None:
            continue
        kind, rel_id = key
        item = items.setdefault(f"{kind}:{rel_id}", Item(kind, rel_id.rsplit("/", 1)[-1] if kind != "quarantine"
                                                         else rel_id, storage.join(root, *rel_id.split("/"))))
        item.bytes += size
        item.mtime = max(item.mtime, mtime)
        item.files.append((rel, size))
    return items, totals


def _item_key(parts: list[str]) -> tuple[str, str] | None:
    """(kind, path of the item under root) for a file at ``parts``; None for the rest (registry, Prefect)."""
    top = parts[0]
    if top == "quarantine" and len(parts) > 1:
        for i in range(1, len(parts)):
            if QUARANTINED.search(parts[i]):
                return "quarantine", "/".join(parts[:i + 1])
        return "quarantine", "/".join(parts[:2])
    if top in SWEPT_DIRS and len(parts) > 1:
        depth = 3 if top == "work" and len(parts) > 2 else 2
        for i in range(1, min(depth, len(parts))):
            if STAGING.search(parts[i]):
                return "staging", "/".join(parts[:i + 1])
        kind = {"datasets": "dataset", "runs": "run", "corpus": "corpus", "work": "work"}[top]
        return kind, "/".join(parts[:depth])
    return None


def _read_json(uri: str, what: str):
    try:
        return storage.read_json(uri)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StorageError(uri, f"{what} unreadable ({type(e).__name__}: {e}); gc deletes nothing") from e


def _describe_dataset(item: Item) -> None:
    manifest = _read_json(storage.join(item.uri, MANIFEST), "dataset manifest")
    if not isinstance(manifest, dict) or "dataset_id" not in manifest:
        raise DatasetError(f"dataset {item.uri} has no readable {MANIFEST} (an unfinished publish or a corrupt "
                           f"dataset): gc deletes nothing until it is removed or quarantined")
    item.refs = {"num_tokens": manifest.get("num_tokens"),
                 "sources": sorted({s.get("sha256") for s in manifest.get("sources", []) if s.get("sha256")})}


def _describe_run(item: Item) -> None:
    from pipeline.training.rundir import FAILED_FILE

    names = {rel.split("/", 2)[2] for rel, _ in item.files if rel.count("/") >= 2}
    lm = _read_json(storage.join(item.uri, "lm.json"), "lm.json") if "lm.json" in names else None
    result = _read_json(storage.join(item.uri, "result.json"), "result.json") if "result.json" in names else None
    if FAILED_FILE in names:
        state = "failed"
    elif isinstance(result, dict) and result.get("finished") is not None:
        state = "finished"
    else:
        state = "unfinished"
    ckpt = sum(size for rel, size in item.files if rel.split("/")[2:3] == [CHECKPOINTS])
    item.refs = {"state": state, "dataset": ((lm or {}).get("dataset") or {}).get("id"),
                 "checkpoint_bytes": ckpt, "checkpoints": sorted(rel for rel, _ in item.files
                                                                 if rel.split("/")[2:3] == [CHECKPOINTS])}
    if state == "unfinished" and storage.is_local(item.uri) and run_dir_locked(item.uri):
        item.refs["state"] = "training"


def run_dir_locked(run_dir: str) -> bool:
    """A live launch holds ``<run_dir>/.lock`` (``pipeline.training.launch``; local roots only)."""
    import filelock

    path = os.path.join(storage.local_path(run_dir), LOCK_FILE)
    if not os.path.exists(path):
        return False
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return True
    lock.release()
    return False


def held_stage_locks(root: str) -> list[str]:
    """The Prefect stage locks held in ``<root>/locks`` (local roots: ``tasks.caching``'s lock files,
    ``<stage>-<key>.lock``) whose holder is not a dead process on this host; an unreadable one counts as held."""
    import socket

    import psutil

    from pipeline.code_version import STAGE_MODULES

    if not storage.is_local(root):
        return []
    directory = os.path.join(storage.local_path(root), "locks")
    held = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if name.split("-", 1)[0] not in STAGE_MODULES:
            continue  # not a stage's lock (the gate's file lock lives here too)
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                holder = str(json.load(f).get("holder") or "")
        except FileNotFoundError:
            continue
        except (OSError, ValueError, AttributeError):
            holder = ""  # being written: held, holder not yet known
        host, _, rest = holder.partition(":")
        pid = rest.split(":", 1)[0]
        if host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            continue
        held.append(name)
    return held


def take_inventory(root: str | None = None, *, registry: bool = True) -> Inventory:
    """Everything under ``root`` and the registry's versions; raises rather than guess."""
    root = storage.storage_root(root)
    now = time.time()
    files = list_files(root)
    items, totals = _group(files, root)
    datasets = {i.id: i for i in items.values() if i.kind == "dataset"}
    runs = {i.id: i for i in items.values() if i.kind == "run"}
    for d in datasets.values():
        _describe_dataset(d)
    for r in runs.values():
        _describe_run(r)
    other = sorted((i for i in items.values() if i.kind not in ("dataset", "run")), key=lambda i: (i.kind, i.id))
    versions = registered_versions(root) if registry else []
    return Inventory(root, now, datasets, runs, versions, read_leases(root), other, held_stage_locks(root), totals)
