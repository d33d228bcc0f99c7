"""A prepared split as one ``.npy`` file in a per-host cache, memory-mapped by every rank.

The ranks of a host share one copy of a split in the page cache instead of each holding
its own: the first rank to ask writes ``<cache>/<key>/<split>.npy`` from the dataset's
shards (each verified against its sha256 as it is read, from a local or an object-store
root alike), under a file lock and atomically (a temporary name, then a rename), then a
small ``<split>.json`` stamp; every rank then maps the file read-only. The key is a hash
of the split's shard hashes, so a re-prepared dataset gets a new file and an unchanged
one is written once per host. A file whose stamp, dtype or length does not match what
the manifest says is rewritten.

Where: ``$RNNLM_SPLIT_CACHE``, else ``$XDG_CACHE_HOME/rnnlm/splits``, else
``~/.cache/rnnlm/splits``. Size: the split's tokens in the manifest's dtype (a byte per
token at char level). Nothing here deletes old entries: remove the directory when no
trainer runs (docs/scale.md).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from pathlib import Path

import numpy as np
from filelock import FileLock

from pipeline import storage
from pipeline.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

ENV_SPLIT_CACHE = "RNNLM_SPLIT_CACHE"
CACHE_FORMAT = 1


def cache_root() -> Path:
    """This host's split cache directory (see the module docstring)."""
    if os.environ.get(ENV_SPLIT_CACHE):
        return Path(os.environ[ENV_SPLIT_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rnnlm" / "splits"


def split_key(manifest: dict, name: str) -> str:
    """What identifies a split's content: its shards' hashes and dtype (not where it is stored)."""
    info = manifest["splits"][name]
    return storage.stable_hash({"format": CACHE_FORMAT, "dtype": manifest["dtype"],
                                "num_tokens": info["num_tokens"],
                                "shards": [s["sha256"] for s in info["shards"]]}, 24)


def mapped_split(ds, name: str, root: Path | None = None) -> np.memmap:
    """Split ``name`` of dataset ``ds`` (a ``shards.Dataset``) as a read-only memory map of the
    host's cached copy, written first if absent or not matching the manifest."""
    if name not in ds.manifest["splits"]:
        raise DatasetError(f"dataset {ds.uri} has no split {name!r}; it has {', '.join(ds.manifest['splits'])}")
    key = split_key(ds.manifest, name)
    directory = (root or cache_root()) / key
    path, stamp = directory / f"{name}.npy", directory / f"{name}.json"
    expected = {"key": key, "dataset_id": ds.manifest.get("dataset_id"), "split": name,
                "num_tokens": ds.manifest["splits"][name]["num_tokens"], "dtype": ds.manifest["dtype"]}
    mapped = _open_if_valid(path, stamp, expected)
    if mapped is not None:
        return mapped
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with FileLock(str(directory / f"{name}.lock")):
            mapped = _open_if_valid(path, stamp, expected)  # another rank of this host wrote it meanwhile
            if mapped is not None:
                return mapped
            _write(ds, name, path, stamp, expected)
    except (PermissionError, NotADirectoryError, FileExistsError) as e:
        raise ConfigError(f"split cache {directory}: cannot write there ({e.strerror or e}); set "
                          f"{ENV_SPLIT_CACHE} to a writable local directory") from None
    mapped = _open_if_valid(path, stamp, expected)
    if mapped is None:
        raise DatasetError(f"split cache {path} does not match {ds.uri} right after writing it")
    return mapped


def _open_if_valid(path: Path, stamp: Path, expected: dict) -> np.memmap | None:
    """The mapped file if its stamp, dtype and length match ``expected``; None if absent or stale."""
    try:
        if json.loads(stamp.read_text()) != expected:
            return None
        ids = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None  # absent, torn or foreign: (re)written under the lock
    if ids.dtype != np.dtype(expected["dtype"]) or ids.shape != (expected["num_tokens"],):
        return None
    return ids


def _write(ds, name: str, path: Path, stamp: Path, expected: dict) -> None:
    """Stream the verified shards into a temporary ``.npy``, then rename it into place; the stamp last."""
    stamp.unlink(missing_ok=True)  # from here until the stamp is back, the entry reads as absent
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(expected["dtype"]),
                                        shape=(expected["num_tokens"],))
        at = 0
        for shard in ds.iter_shards(name):  # each shard checked against its sha256
            if at + len(shard) > len(out):
                raise DatasetError(f"split {name!r} of {ds.uri}: shards hold more than the manifest's "
                                   f"{len(out)} tokens")
            out[at: at + len(shard)] = shard
            at += len(shard)
            release(out)  # written pages go to the page cache, not this process's resident set
        if at != len(out):
            raise DatasetError(f"split {name!r} of {ds.uri}: manifest says {len(out)} tokens, shards hold {at}")
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    storage.write_json_atomic(str(stamp), expected)
    log.info("split cache: wrote %s (%d tokens, %s)", path, expected["num_tokens"], expected["dtype"])


def release(ids: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process's resident set (they stay in the
    page cache, shared by the host's ranks: touching them again is a minor fault). No-op for
    an array in memory."""
    m = getattr(ids, "_mmap", None)  # numpy keeps the mmap object of a np.memmap (and its views) here
    if isinstance(m, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        m.madvise(mmap.MADV_DONTNEED)
