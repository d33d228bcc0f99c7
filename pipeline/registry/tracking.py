"""MLflow tracking: where runs live, the client, fail-closed registry access, experiments.

Logging one finished training as a run is ``pipeline.registry.run_logging``.

Where things live. ``$MLFLOW_TRACKING_URI`` wins when set (an ``http://`` MLflow server,
or any database URI); the registry URI is the same. Otherwise the storage root
(``$RNNLM_STORAGE`` or ``./.rnnlm``) must be a local directory, and tracking and registry
are ``sqlite:///<root>/mlflow.db`` with artifacts under ``<root>/mlartifacts/<experiment>``.
A remote root (``s3://...``) without ``$MLFLOW_TRACKING_URI`` is a ConfigError: a
SQLite file cannot live in an object store.

A new SQLite database is created once, under an exclusive file lock on ``<db>.lock``
(``ensure_tracking_db``): MLflow runs its schema migrations when a store first opens a
database, and two processes doing that at once on a new file race.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from filelock import FileLock

from pipeline import storage
from pipeline.errors import ConfigError, PipelineError, RegistryUnavailableError

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


# ---------------------------------------------------------------------------- tracking URI


def tracking_uri(root: str | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db`` for a local storage root."""
    return os.environ.get(ENV_TRACKING_URI) or local_tracking_uri(root)


def local_tracking_uri(root: str | None = None) -> str:
    """``sqlite:///<root>/mlflow.db``; a ConfigError for a remote storage root."""
    root = storage.storage_root(root)
    if not storage.is_local(root):
        raise ConfigError(f"storage root {root} is not a local directory, so the default SQLite "
                          f"tracking store cannot live there: set {ENV_TRACKING_URI} (e.g. to an "
                          f"MLflow server, http://host:5000)")
    return "sqlite:///" + os.path.join(storage.local_path(root), DB_FILE)


def sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///<path>`` URI; None for other URIs and in-memory SQLite."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else path


def default_artifact_location(experiment: str, uri: str, root: str | None = None) -> str | None:
    """``<root>/mlartifacts/<experiment>`` for a SQLite store with a local root, else None
    (a tracking server decides where its artifacts go)."""
    root = storage.storage_root(root)
    if sqlite_path(uri) is None or not storage.is_local(root):
        return None
    return os.path.join(storage.local_path(root), ARTIFACTS_DIR, experiment)


def exclusive_lock(path: str) -> FileLock:
    """An exclusive OS file lock on ``path`` (its directory created), released on exit or process death."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return FileLock(path)


@contextlib.contextmanager
def model_lock(name: str, purpose: str, root: str | None = None) -> Iterator[None]:
    """Serialize ``purpose`` ("gate", "register") for registered model ``name`` across the
    processes and threads of this machine: a file lock on ``<root>/locks/<purpose>-<name>.lock``
    for a local storage root. A no-op for a remote root, where the orchestrator's concurrency
    limit (``tasks.register.GATE_LIMIT``) serializes it across hosts."""
    import logging

    root = storage.storage_root(root)
    if not storage.is_local(root):
        logging.getLogger(__name__).debug("storage root %s is remote: %s for %s relies on the orchestrator's lock",
                                          root, purpose, name)
        yield
        return
    with exclusive_lock(os.path.join(storage.local_path(root), "locks", f"{purpose}-{name}.lock")):
        yield


_READY: set[str] = set()


def ensure_tracking_db(uri: str | None = None, root: str | None = None) -> str:
    """Create (and migrate) a SQLite tracking database once, under a file lock; idempotent.

    Other URIs (a server, another database) are returned unchanged. Returns the URI.
    """
    uri = uri or tracking_uri(root)
    path = sqlite_path(uri)
    if path is None or uri in _READY:
        return uri
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    artifacts = os.path.join(os.path.dirname(path), ARTIFACTS_DIR)
    with exclusive_lock(path + ".lock"):
        # Opening the stores creates the tables and runs any pending migrations; under the lock
        # only one process ever does that on a given file.
        TrackingStore(uri, artifacts)
        RegistryStore(uri)
    _READY.add(uri)
    return uri


_ENV_URIS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def using_tracking(root: str | None = None) -> Iterator[str]:
    """MLflow's fluent API (``log_model``, ``register_model``, ``pyfunc.load_model("models:/...")``)
    on our URI inside the block; MLflow's URI globals and ``$MLFLOW_*_URI`` restored on exit.

    Not thread-safe against other threads changing MLflow's global URIs at the same time.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    uri = ensure_tracking_db(tracking_uri(root), root)
    saved_env = {k: os.environ.get(k) for k in _ENV_URIS}
    # MLflow has no public getter that tells "unset" from "default": read its globals.
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _is_registry_failure(e: BaseException) -> bool:
    from mlflow.exceptions import MlflowException
    from requests import RequestException
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(e, (MlflowException, SQLAlchemyError, RequestException, ConnectionError, TimeoutError))


@contextlib.contextmanager
def registry_access(what: str) -> Iterator[None]:
    """Fail closed: an MLflow, database or network error inside becomes a retryable
    ``RegistryUnavailableError`` naming ``what``, so a failed read never counts as "absent".
    Also a decorator."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as e:
        if not _is_registry_failure(e):
            raise
        if storage.is_disk_full(e):  # SQLite's "database or disk is full": asking again soon cannot help
            error = RegistryUnavailableError(f"{what}: the MLflow store {_store_name()} has no space left on device; "
                                             f"nothing was promoted; free space there and run again")
            error.retryable = False
            raise error from e
        raise RegistryUnavailableError(f"{what}: the MLflow registry failed ({type(e).__name__}: {e}); "
                                       f"nothing was promoted, retrying may help") from e


def _store_name() -> str:
    """The tracking store as an error message names it."""
    try:
        return tracking_uri()
    except PipelineError:
        return "(no tracking URI)"


def client(root: str | None = None):
    """An ``MlflowClient`` on our tracking and registry URI (the database created if new)."""
    from mlflow import MlflowClient

    uri = ensure_tracking_db(tracking_uri(root), root)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_name(preset: str) -> str:
    return f"rnnlm-{preset}"


def get_or_create_experiment(c, name: str, root: str | None = None) -> str:
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=default_artifact_location(name, c.tracking_uri, root))
    except MlflowException:  # another process created it first
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
