"""Content-addressed caching of the pipeline's stages: cache keys, dangling records, locks, binding.

Every stage's cache key is ``<stage>-<hash>`` of three things:

* the **content identity** of the stage's real inputs, built by a small per-stage
  ``identity`` function from the task's parameters: content hashes (a corpus
  document's sha256, an upstream stage's manifest ``id``), never URLs or paths;
* the stage's **config** (the pydantic section that affects it, as JSON);
* the stage's **code version**: the ``VERSION`` constant of the stage's module (bump it
  when a stage's meaning changes), ``pipeline.data.prepare.DATA_FORMAT_VERSION`` for data
  stages, a hash of the task function's source, and a digest of the source of every
  project module the stage runs, upstream stages' included
  (``pipeline.code_version.STAGE_MODULES``): editing ``pipeline/data/tokenizer.py`` recomputes
  the data stages and everything downstream; editing the registry recomputes nothing.

The same identity (without the task source hash) names the stage's outputs in the store
(``<root>/work/<stage>/<id>...``, ``<root>/datasets/<dataset_id>``,
``<root>/runs/<run_id>``), so a recomputation writes to the same place.

Results (the small JSON manifests the tasks return) are persisted as JSON under
``options.results`` (default ``<root>/prefect-results``; any fsspec URL), so keys
are valid across flow runs and processes. A manifest lists the URIs it points to in
``artifacts``; before Prefect looks a key up, :class:`StagePolicy` reads the cached
record and, if any artifact no longer exists (or the stage's ``verify`` finds one broken:
``write_shards`` hashes its dataset and quarantines one that fails), deletes the record,
so the stage recomputes instead of returning a dangling URI.

Concurrency: keys are looked up and written under ``SERIALIZABLE`` isolation with a
lock manager, so two runs of a stage on the same inputs compute once: the second waits
for the first's lock, then finds its record (state ``Cached``). Locally the lock manager
is Prefect's ``FileSystemLockManager`` (``options.locks``, default ``<root>/locks``). For
runs on several hosts use a shared lock service: ``pip install 'rnnlm[redis]'`` and set
``options.redis_url`` (``redis://host:6379/0``), which selects
``prefect_redis.locking.RedisLockManager``; with a file lock directory this only works if
every host sees the same directory with working ``O_EXCL`` creation (not on object stores).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager
from prefect.tasks import Task
from pydantic import BaseModel

from pipeline import storage
from pipeline.code_version import code_digest
from tasks.options import PipelineOptions

log = logging.getLogger("tasks")


# ----------------------------------------------------------------------------- identities


def jsonable(value: Any) -> Any:
    """Pydantic models and dataclasses -> plain JSON values (for hashing)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def content_id(stage: str, version: int, identity: Any, length: int = 24) -> str:
    """The content address of a stage's output: what went in and which code made it."""
    return storage.stable_hash({"stage": stage, "version": version, "code": code_digest(stage),
                                "inputs": jsonable(identity)}, length)


@functools.lru_cache(maxsize=None)
def source_hash(fn: Callable) -> str:
    """A hash of a function's source (its code version); '' if the source is unavailable."""
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return ""


# ------------------------------------------------------------------------------- caching


@dataclass
class StagePolicy(CachePolicy):
    """Cache key = stage + content identity of the inputs + stage config + code version
    (the modules' digest is part of :func:`content_id`).

    ``identity(inputs) -> (version, identity)`` comes from the stage's module; returning
    None means "do not cache this call". ``verify(cached manifest, inputs)`` (optional)
    returns what is wrong with a cached result's artifacts beyond their existence (None:
    nothing), and the record is dropped like a dangling one. See the module docstring.
    """

    stage: str = ""
    identity: Optional[Callable[[dict[str, Any]], Any]] = None
    verify: Optional[Callable[[dict[str, Any], dict[str, Any]], Optional[str]]] = None
    results_url: Optional[str] = None  # where records live, to drop dangling ones

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> Optional[str]:
        if self.identity is None:
            return None
        ident = self.identity(inputs)
        if ident is None:
            return None
        version, what = ident
        fn = getattr(getattr(task_ctx, "task", None), "fn", None)
        key = f"{self.stage}-" + storage.stable_hash(
            {"id": content_id(self.stage, version, what), "code": source_hash(fn) if fn else ""}, 32)
        if self.results_url:
            verify = functools.partial(self.verify, inputs=inputs) if self.verify else None
            drop_if_dangling(self.results_url, key, self.stage, verify)
        return key


def drop_if_dangling(results_url: str, key: str, stage: str,
                     verify: Optional[Callable[[dict[str, Any]], Optional[str]]] = None) -> bool:
    """Delete the cached record ``key`` if an artifact it lists no longer exists, or ``verify``
    (the stage's deeper check of its manifest) finds a problem. True if dropped."""
    from prefect.results import ResultRecord

    record_url = storage.join(results_url, key)
    try:
        raw = storage.read_bytes(record_url)
    except (FileNotFoundError, OSError):
        return False
    try:
        manifest = ResultRecord.deserialize(raw).result
        artifacts = manifest.get("artifacts", []) if isinstance(manifest, dict) else []
        missing = [u for u in artifacts if not storage.exists(u)]
        problem = f"artifact(s) missing: {', '.join(missing)}" if missing else None
    except Exception as e:  # an unreadable record is as good as none
        manifest = None
        problem = f"unreadable cache record ({type(e).__name__}: {e})"
    if not problem and verify is not None and isinstance(manifest, dict):
        problem = verify(manifest)  # outside the except above: a failure to verify is an error, never "absent"
    if not problem:
        return False
    run_logger().warning("stage %s: cached result %s is stale, %s; recomputing", stage, key, problem)
    try:
        fs, path = storage.filesystem(record_url)
        fs.rm(path)
    except FileNotFoundError:
        pass
    return True


def run_logger():
    """The Prefect run logger inside a run, else this package's logger."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:
        return log


# ------------------------------------------------------------------------------- binding


def result_storage_block(url: str):
    """Prefect result storage for a local directory (a Path) or any fsspec URL.

    Prefect wants non-local storage as a saved block: a ``RemoteFileSystem`` block named
    after the URL is saved (idempotently) and referred to by its slug.
    """
    if storage.is_local(url):
        path = Path(storage.local_path(url)).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    from prefect.filesystems import RemoteFileSystem

    name = "rnnlm-results-" + storage.stable_hash(url, 12)
    RemoteFileSystem(basepath=url).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def lock_manager(options: PipelineOptions):
    if options.redis_url:
        try:
            from prefect_redis.locking import RedisLockManager  # type: ignore[import-not-found]
        except ImportError:
            from pipeline.errors import ConfigError

            raise ConfigError("options.redis_url needs the prefect-redis package: pip install 'rnnlm[redis]'") from None
        # the URL as given: redis://, rediss:// (TLS), user:password@, redis+sentinel://
        return RedisLockManager(connection_url=options.redis_url)
    return LocalLockManager(lock_files_directory=Path(options.lock_dir()))


class LocalLockManager(FileSystemLockManager):
    """Prefect's file lock manager, plus: a lock whose holder was a process on this host that
    no longer exists (killed, crashed) is stale and is broken, instead of blocking every later
    run of that stage forever (Prefect's file locks never expire without a hold timeout).

    Also: Prefect creates a lock file empty and writes its holder a moment later, so a
    concurrent reader can find it empty and fail to parse it (found by the concurrency test).
    Here an empty or half-written lock file reads as "held, holder not yet known"."""

    def _get_lock_info(self, key: str, use_cache: bool = True):
        try:
            return super()._get_lock_info(key, use_cache=use_cache)
        except ValueError:  # empty / partial JSON: the holder is writing it right now
            return {"holder": "", "expiration": None, "path": self._lock_path_for_key(key)}

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        if not super().is_locked(key, use_cache):
            return False
        info = self._get_lock_info(key, use_cache=False)
        parts = ((info or {}).get("holder") or "").split(":")
        if len(parts) >= 2 and parts[0] == socket.gethostname() and parts[1].isdigit() \
                and not psutil.pid_exists(int(parts[1])):
            run_logger().warning("breaking stale lock %s held by dead process %s", key, ":".join(parts))
            self._locks.pop(key, None)
            try:
                self._lock_path_for_key(key).unlink()
            except FileNotFoundError:
                pass
            return False
        return True

def bind(task: Task, options: PipelineOptions, **task_options: Any) -> Task:
    """The task as this run needs it: result storage, serializable cached keys, retries."""
    policy = task.cache_policy
    extra: dict[str, Any] = {}
    if isinstance(policy, StagePolicy):
        results = options.results_url()
        policy = policy.configure(isolation_level="SERIALIZABLE", lock_manager=lock_manager(options))
        policy.results_url = results
        extra = {"cache_policy": policy, "result_storage": result_storage_block(results),
                 "result_serializer": "json", "persist_result": True}
    return task.with_options(**extra, **task_options)


def manifest(id: str, artifacts: list[str], **fields: Any) -> dict[str, Any]:
    """A stage's return value: its content id, the URIs it vouches for, and small numbers."""
    return {"id": id, **fields, "artifacts": list(artifacts)}
