"""Where artifacts live: a root URI (a local directory, s3://, gs://, memory://...).

Artifacts are immutable and content-addressed, and a crash never leaves a file
that looks complete: locally every write lands under a temporary name and is
renamed into place; on object stores (S3, GCS, Azure) one upload is atomic by
itself (the object appears whole or not at all), so a file is put directly.
A directory artifact is complete when its manifest exists, and the manifest is
always the last thing written (see ``publish_dir``).

Object-store listings are never cached: another process (a worker on another
host, the trainer child) may have written a file since this one last looked.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

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


# Object stores: one PUT is atomic, there is no rename (a "move" is copy + delete).
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_object_store(url: str) -> bool:
    return protocol(url) in OBJECT_STORES


# The extra (pyproject.toml) that installs each protocol's fsspec implementation.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        if is_object_store(url):  # a cached listing would hide files other processes wrote since
            return fsspec.core.url_to_fs(url, use_listings_cache=False)
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # a default install without the extra for this store
        from pipeline.errors import ConfigError

        extra = EXTRAS.get(protocol(url))
        fix = f"pip install 'rnnlm[{extra}]'" if extra else str(e)
        raise ConfigError(f"{url}: {protocol(url)}:// needs an optional dependency: {fix}") from None


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then rename it onto ``url`` (on object stores:
    one upload, atomic by itself)."""
    fs, path = filesystem(url)
    if is_object_store(url):
        fs.pipe_file(path, bytes(data))
        return
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
    """Move a fully written staging directory, whose completeness ``marker`` was written last,
    to its final name. Returns False if the artifact was already published (same content:
    ours is discarded).

    Locally this is one atomic rename. On object stores a directory "rename" copies files,
    so every data file is copied (server-side) and verified first and the marker last; a
    final directory without its marker (a publish killed halfway) is never trusted: it is
    overwritten file by file, then completed with the marker.
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
    if fs.exists(posixpath.join(final, marker)):
        fs.rm(staging, recursive=True)
        return False
    sources = {posixpath.relpath(p, staging): info["size"] for p, info in fs.find(staging, detail=True).items()}
    if marker not in sources:
        raise FileNotFoundError(f"cannot publish {staging_url}: its {marker} is missing (an unfinished staging dir)")
    for name in sorted(sources, key=lambda n: n == marker):  # the marker last
        target = posixpath.join(final, name)
        fs.copy(posixpath.join(staging, name), target)
        size = fs.info(target)["size"]
        if size != sources[name]:
            raise OSError(f"publishing {final_url}: {name} landed with {size} bytes, expected {sources[name]}")
    fs.rm(staging, recursive=True)
    return True


# S3 error codes that the same request will get again (s3fs raises them as OSError, with
# botocore's ClientError as the cause): retrying them only delays the real message.
PERMANENT_S3_CODES = frozenset({
    "InvalidBucketName", "NoSuchBucket", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId",
    "SignatureDoesNotMatch", "AccountProblem", "InvalidArgument", "InvalidRequest", "InvalidObjectState",
})


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and its causes (``__cause__``, else ``__context__``), each once."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _s3_code(exc: BaseException) -> str | None:
    """The error code of a botocore ``ClientError`` (``AccessDenied``, ``SlowDown``, ``403``...)."""
    code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
    return None if code is None else str(code)


def is_permanent_error(exc: BaseException) -> bool:
    """An I/O error that retrying cannot fix: permission denied, an invalid argument (s3fs's
    errno for an invalid bucket name), or a permanent S3 error code anywhere in the cause chain."""
    return any(isinstance(e, PermissionError) or getattr(e, "errno", None) in (errno.EINVAL, errno.EACCES, errno.EPERM)
               or _s3_code(e) in PERMANENT_S3_CODES for e in _chain(exc))


# A missing, unreadable or misplaced input is there (or not) on every attempt.
PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def fails_every_time(exc: BaseException) -> bool:
    """Known to fail the same way on every attempt: a PipelineError that says so, a missing or
    unreadable input, an object store's permanent refusal. (Not the same as "not retried": an
    unexpected error is not retried either, but nothing says a new run would fail too.)"""
    from pipeline.errors import PipelineError

    if isinstance(exc, PipelineError):
        return not exc.retryable
    return isinstance(exc, PERMANENT_OS_ERRORS) or is_permanent_error(exc)


def endpoint(url: str) -> str:
    """Where an object store's client sends requests for ``url``: its endpoint, as configured."""
    if protocol(url) in ("s3", "s3a"):
        return (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or "the default AWS S3 endpoint")
    return f"the default {protocol(url)}:// endpoint"


def store_failure(url: str, exc: BaseException):
    """An object-store client's failure under root ``url`` as a one-line ``StorageError`` naming
    the root and the endpoint (retryable unless the store refused for good); None when ``exc``
    did not come from the object store's client."""
    from pipeline.errors import StorageError

    if not is_object_store(url):
        return None
    names = {c.__name__ for e in _chain(exc) for c in type(e).__mro__}  # by name: botocore need not be installed
    code = next(filter(None, map(_s3_code, _chain(exc))), None)
    where = f"at {endpoint(url)}"
    if {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"} & names:  # botocore's, aiohttp's
        return StorageError(url, f"cannot be reached {where} (the S3 client's retries are spent: AWS_MAX_ATTEMPTS); "
                                 f"retrying later may help", retryable=True)
    if code is None and "BotoCoreError" not in names:
        return None
    if is_permanent_error(exc):
        return StorageError(url, f"refused {where}: {code or type(exc).__name__} ({exc}); check the credentials, "
                                 f"the bucket and its permissions")
    return StorageError(url, f"failed {where}: {code or type(exc).__name__} ({exc}); retrying later may help",
                        retryable=True)


def makedirs(url: str) -> None:
    """Create a directory (on S3 this may create the bucket); a refusal is a StorageError naming
    ``url`` that says whether retrying can help."""
    from pipeline.errors import StorageError

    fs, path = filesystem(url)
    try:
        fs.makedirs(path, exist_ok=True)
    except OSError as e:
        raise StorageError(url, f"cannot create it: {e}", retryable=not is_permanent_error(e)) from e


QUARANTINE = "quarantine"


def quarantine(url: str, root: str) -> str | None:
    """Move a file or directory that failed verification out of the way of its rebuild, to
    ``<root>/quarantine/<its path under root>.<UTC time>-<random>``: kept for a post-mortem,
    never silently deleted. None if it was already gone (a concurrent run moved it first).
    A root that cannot be written raises ``StorageError``."""
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
            raise unwritable(root, f"{dest} (to quarantine {url})", e) from None
        raise
    return dest


def is_unwritable(e: BaseException) -> bool:
    """A write refused for good: no permission, a read-only filesystem, a permanent refusal, a full disk."""
    return getattr(e, "errno", None) == errno.EROFS or is_permanent_error(e) or is_disk_full(e)


# A full filesystem or an exhausted quota: the same write fails until someone frees space.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(e: BaseException | None) -> bool:
    """An ENOSPC / EDQUOT anywhere in the cause chain (SQLite and torch wrap the OSError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) in DISK_FULL_ERRNOS or "database or disk is full" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def unwritable(root: str, what: str, cause: BaseException | str):
    """The ``StorageError`` for a refused write: it names the root and what could not be written."""
    from pipeline.errors import StorageError

    reason = getattr(cause, "strerror", None) or str(cause)
    if isinstance(cause, BaseException) and is_disk_full(cause):
        return StorageError(root, f"no space left on device: could not write {what}; free space there and run "
                                  f"again (a training resumes from its last checkpoint)")
    return StorageError(root, f"not writable: could not write {what} ({reason})")


def free_bytes(url: str) -> int | None:
    """Free bytes on the local filesystem holding ``url`` (its nearest existing parent); None for object stores."""
    if not is_local(url):
        return None
    path = Path(local_path(url)).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short hash of a JSON-serialisable value (keys sorted): the content address of a config."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]
