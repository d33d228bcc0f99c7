"""MLflow tracking: where runs live, the client, and logging one finished training as a run.

    run_id = log_training_run(run_dir, dataset, preset="timemachine-char", config=run_cfg,
                              flow_run_id=..., flow_run_url=...)

Where things live. ``$MLFLOW_TRACKING_URI`` wins when set (an ``http://`` MLflow server,
or any database URI); the registry URI is the same. Otherwise the storage root
(``$RNNLM_STORAGE`` or ``./.rnnlm``) must be a local directory, and tracking and registry
are ``sqlite:///<root>/mlflow.db`` with artifacts under ``<root>/mlartifacts/<experiment>``.
A remote root (``s3://...``) without ``$MLFLOW_TRACKING_URI`` is a ConfigError: a
SQLite file cannot live in an object store.

A new SQLite database is created once, under an exclusive file lock on ``<db>.lock``
(``ensure_tracking_db``): MLflow runs its schema migrations when a store first opens a
database, and two processes doing that at once on a new file race.

Logging refuses failed trainings (``pipeline.run_checks``): nothing is logged for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock

from pipeline import storage
from pipeline.config import RunConfig
from pipeline.errors import ConfigError, PipelineError, RegistryError, RegistryUnavailableError
from pipeline.metrics import read_epochs
from pipeline.metrics import with_bits
from pipeline.run_checks import check_training_succeeded, load_run_lm
from pipeline.run_record import code_version, flatten, generate_samples, run_files

log = logging.getLogger(__name__)

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
EPOCH_METRICS = ("train_ppl", "val_ppl", "train_bits", "val_bits", "tokens_per_s", "grad_norm", "lr")


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
        raise RegistryUnavailableError(f"{what}: the MLflow registry failed ({type(e).__name__}: {e}); "
                                       f"nothing was promoted, retrying may help") from e


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


# ----------------------------------------------------------------------------- logging


@registry_access("logging a training run in MLflow")
def log_training_run(run_dir: str, dataset, *, preset: str, config: RunConfig,
                     flow_run_id: str | None = None, flow_run_url: str | None = None,
                     samples: list[str] | None = None, sample_prefixes: list[str] | None = None,
                     run_key: str | None = None, root: str | None = None,
                     held_out: dict[str, float | None] | None = None) -> str:
    """Log one finished training as an MLflow run in experiment ``rnnlm-<preset>``; return its id.

    Params: ``config`` flattened (``model.hidden_size``, ``train.lr``, ``data.sources.0.url``...).
    Metrics: every epoch of metrics.jsonl (step = epoch), ``final_val_ppl`` and
    ``final_test_ppl`` (fixed evaluation settings, the figures the gate compares), each
    perplexity with its bits per token (``*_bits``) beside it. ``held_out`` passes figures
    already computed by the one evaluation (``{"val_ppl": .., "test_ppl": ..}``, the
    evaluate task's), so they are logged as they are, not computed a second time.
    Artifacts: ``perplexity.png``, ``samples.txt``, ``vocab.json``, ``manifest.json``,
    ``lm.json``, ``result.json``, ``metrics.jsonl``. Tags: lineage (Prefect flow run, dataset,
    sources, code version). ``samples`` are texts logged as given; otherwise samples are
    generated (greedy and seeded sampling, 100 tokens) from ``sample_prefixes``, by default
    the first 10 tokens of the validation split. Raises UnregistrableRunError for a failed run,
    RegistryUnavailableError (retryable) when MLflow fails.

    Idempotent: the run is tagged ``rnnlm.run_key`` (``run_key``, default a hash of
    ``run_dir``), and a FINISHED run with the same key in the experiment is returned
    instead of logging again, so a retried orchestrator task does not duplicate it.
    """
    from mlflow.entities import Param

    result = check_training_succeeded(run_dir)
    lm = load_run_lm(run_dir, dataset)
    if lm.dataset_id is not None and lm.dataset_id != dataset.dataset_id:
        raise RegistryError(f"{run_dir}/lm.json says the model was trained on dataset {lm.dataset_id}, "
                            f"not {dataset.dataset_id}")
    c = client(root)
    experiment_id = get_or_create_experiment(c, experiment_name(preset), root)
    run_key = run_key or hashlib.sha256(str(run_dir).encode("utf-8")).hexdigest()[:32]
    if not all(ch.isalnum() or ch in "-_." for ch in run_key):
        raise ConfigError(f"run_key {run_key!r} may hold only letters, digits, '-', '_' and '.'")
    done = c.search_runs([experiment_id], f"tags.`rnnlm.run_key` = '{run_key}' and attributes.status = 'FINISHED'",
                         max_results=1)
    if done:
        log.info("run %s already logged as MLflow run %s", run_dir, done[0].info.run_id)
        return done[0].info.run_id

    tags = _lineage_tags(run_dir, dataset, lm, preset, run_key, flow_run_id, flow_run_url)
    run = c.create_run(experiment_id, run_name=f"{preset}-{flow_run_id or time.strftime('%Y%m%d-%H%M%S')}",
                       tags={k: v for k, v in tags.items() if v != ""})
    run_id = run.info.run_id
    try:
        params = {"preset": preset, **flatten(config.model_dump(mode="json"))}
        _log_batch(c, run_id, params=[Param(k, str(v)) for k, v in params.items()])
        epochs = read_epochs(run_dir)
        figures = _log_metrics(c, run_id, lm, dataset, result, epochs, held_out)
        if samples is None:
            samples = generate_samples(lm, dataset, sample_prefixes)
        _log_artifacts(c, run_id, run_files(run_dir, lm, dataset.manifest, result, epochs, samples,
                                            f"{preset} ({lm.model.cfg.cell})"))
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")
    log.info("logged run %s (experiment %s): val ppl %s, test ppl %s", run_id, experiment_name(preset),
             figures["final_val_ppl"], figures["final_test_ppl"])
    return run_id


def _lineage_tags(run_dir: str, dataset, lm, preset: str, run_key: str,
                  flow_run_id: str | None, flow_run_url: str | None) -> dict[str, str]:
    version, version_source = code_version()
    tags = {
        "rnnlm.preset": preset,
        "rnnlm.run_dir": str(run_dir),
        "rnnlm.run_key": run_key,
        "data.dataset_id": dataset.dataset_id,
        "data.uri": dataset.uri,
        "data.manifest_sha256": lm.meta["dataset"]["manifest_sha256"],
        "data.vocab_sha256": lm.meta["vocab_sha256"],
        "code.version": version,
        "code.version_source": version_source,
        "prefect.flow_run_id": flow_run_id or "",
        "prefect.flow_run_url": flow_run_url or "",
    }
    if version_source == "git":
        tags["mlflow.source.git.commit"] = version
    for i, src in enumerate(dataset.manifest.get("sources", [])):
        tags[f"data.source.{i}.uri"] = str(src.get("source"))
        tags[f"data.source.{i}.sha256"] = str(src.get("sha256"))
    return tags


def _log_metrics(c, run_id: str, lm, dataset, result: dict[str, Any], epochs: list[dict[str, Any]],
                 held_out: dict[str, float | None] | None = None) -> dict[str, float | None]:
    """Per-epoch metrics, training totals and the final held-out figures; returns the latter."""
    from mlflow.entities import Metric, RunTag

    from pipeline.evaluate import EVAL_BATCH_SIZE, EVAL_NUM_STEPS

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(e[k]), now, int(e["epoch"])) for e in epochs for k in EPOCH_METRICS
               if isinstance(e.get(k), (int, float)) and math.isfinite(e[k])]
    figures: dict[str, float | None] = {"final_val_ppl": None, "final_test_ppl": None}
    for split in ("val", "test"):
        if held_out is not None:
            figures[f"final_{split}_ppl"] = held_out.get(f"{split}_ppl")
            continue
        ids = dataset.split(split)
        if len(ids) >= 2:
            figures[f"final_{split}_ppl"] = lm.perplexity(ids)
    for k in ("wall_s", "tokens_per_s", "epochs", "steps"):
        if isinstance(result.get(k), (int, float)):
            metrics.append(Metric(f"train_{k}" if not k.startswith("train") else k, float(result[k]), now, 0))
    metrics += [Metric(k, v, now, len(epochs)) for k, v in with_bits(figures).items() if v is not None]
    _log_batch(c, run_id, metrics=metrics)
    _log_batch(c, run_id, tags=[RunTag("eval.batch_size", str(EVAL_BATCH_SIZE)),
                                RunTag("eval.num_steps", str(EVAL_NUM_STEPS)),
                                RunTag("train.finished", str(bool(result.get("finished"))).lower())])
    return figures


def _log_artifacts(c, run_id: str, files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        c.log_artifacts(run_id, tmp)


def _log_batch(c, run_id: str, *, params=(), metrics=(), tags=()) -> None:
    """MlflowClient.log_batch in chunks under MLflow's limits (100 params, 1000 items per call)."""
    params, metrics, tags = list(params), list(metrics), list(tags)
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[i:i + 1000])
    for i in range(0, len(tags), 100):
        c.log_batch(run_id, tags=tags[i:i + 100])
