"""Where artifacts live: a root URI (a local directory, s3://, gs://, memory://...).

Artifacts are immutable and content-addressed, and every write lands under a
temporary name first and is renamed into place, so a crash never leaves a file
that looks complete. A directory artifact is complete when its manifest exists,
and the manifest is always the last thing written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

ENV_STORAGE = "RNNLM_STORAGE"
DEFAULT_STORAGE = ".rnnlm"


def storage_root(root: str | os.PathLike | None = None) -> str:
    """The artifact root: ``root`` if given, else ``$RNNLM_STORAGE``, else ``./.rnnlm``.

    Local paths come back absolute so URIs stay valid from any working directory.
    """
    root = str(root or os.environ.get(ENV_STORAGE) or DEFAULT_STORAGE)
    if is_local(root):
        return str(Path(local_path(root)).resolve())
    return root.rstrip("/")


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', whatever the filesystem."""
    return posixpath.join(base, *parts) if "://" in base else os.path.join(base, *parts)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then rename it onto ``url``."""
    fs, path = filesystem(url)
    parent = posixpath.dirname(path) if not isinstance(fs, LocalFileSystem) else os.path.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        if isinstance(fs, LocalFileSystem):
            os.replace(tmp, path)  # atomic on POSIX
        else:
            fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def write_json_atomic(url: str, obj: Any) -> None:
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def new_staging_dir(final_url: str) -> str:
    """A fresh directory beside ``final_url`` to build an artifact in."""
    return f"{final_url.rstrip('/')}.tmp-{uuid.uuid4().hex[:12]}"


def publish_dir(staging_url: str, final_url: str, marker: str = "manifest.json") -> bool:
    """Move a fully written staging directory to its final name.

    Locally this is one atomic rename. If another worker published the same
    content-addressed artifact first, ours is discarded and False is returned.
    On object stores a directory "rename" copies files, so there the ``marker``
    file (the manifest) is copied last: its presence marks the artifact complete.
    """
    fs, staging = filesystem(staging_url)
    _, final = filesystem(final_url)
    if isinstance(fs, LocalFileSystem):
        try:
            os.rename(staging, final)
            return True
        except OSError:
            if os.path.isdir(final):  # a concurrent run won the race: same content, keep theirs
                fs.rm(staging, recursive=True)
                return False
            raise
    if fs.exists(final):
        fs.rm(staging, recursive=True)
        return False
    files = sorted(fs.find(staging), key=lambda f: f.rsplit("/", 1)[-1] == marker)  # the marker last
    for f in files:
        fs.copy(f, final + f[len(staging.rstrip("/")):])
    fs.rm(staging, recursive=True)
    return True


QUARANTINE = "quarantine"


def quarantine(url: str, root: str) -> str | None:
    """Move a file or directory that failed verification out of the way of its rebuild, to
    ``<root>/quarantine/<its path under root>.<UTC time>-<random>``: kept for a post-mortem,
    never silently deleted. None if it was already gone (a concurrent run moved it first).
    A root that cannot be written raises ``StorageError``."""
    from pipeline.errors import StorageError

    rel = url[len(root):].strip("/") if url.startswith(root) else url.rstrip("/").rsplit("/", 1)[-1]
    dest = join(root, QUARANTINE, f"{rel}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}")
    fs, src = filesystem(url)
    _, dst = filesystem(dest)
    try:
        fs.makedirs(posixpath.dirname(dst) if "://" in dest else os.path.dirname(dst), exist_ok=True)
        if isinstance(fs, LocalFileSystem):
            os.rename(src, dst)
        else:
            fs.mv(src, dst, recursive=True)
    except FileNotFoundError:
        return None
    except OSError as e:
        if is_unwritable(e):
            raise StorageError(root, f"{dest} (to quarantine {url})", e) from None
        raise
    return dest


def is_unwritable(e: OSError) -> bool:
    """A write refused for good: no permission or a read-only filesystem."""
    return isinstance(e, PermissionError) or e.errno == errno.EROFS


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short hash of a JSON-serialisable value (keys sorted): the content address of a config."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]
