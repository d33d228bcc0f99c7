"""MLflow tracking and model registry: one MLflow run per retrain, versions, a promotion gate.

    run_id = log_training_run(run_dir, dataset, preset="timemachine-char", config=run_cfg,
                              flow_run_id=..., flow_run_url=...)
    mv = register_model(run_id, run_dir, preset="timemachine-char")   # alias "challenger"
    decision = promote_if_better(mv.name, mv.version, dataset)        # maybe alias "champion"
    model = load_champion("rnnlm-timemachine-char")
    model.predict(["time traveller"], params={"num_tokens": 50, "seed": 0})

Where things live. ``$MLFLOW_TRACKING_URI`` wins when set (an ``http://`` MLflow server,
or any database URI); the registry URI is the same. Otherwise the storage root
(``$RNNLM_STORAGE`` or ``./.rnnlm``) must be a local directory, and tracking and registry
are ``sqlite:///<root>/mlflow.db`` with artifacts under ``<root>/mlartifacts/<experiment>``.
A remote root (``s3://...``) without ``$MLFLOW_TRACKING_URI`` is a ConfigError: a
SQLite file cannot live in an object store.

A new SQLite database is created once, under an exclusive ``flock`` on
``<db>.lock`` (``ensure_tracking_db``): MLflow runs its schema migrations when a store
first opens a database, and two processes doing that at once on a new file race.

Registration refuses failed trainings: a ``FAILED.json`` in the run directory, a
missing or non-finite ``result.json`` perplexity, or non-finite weights raise
``TrainingFailedError`` before anything is logged or registered.

The promotion gate compares perplexities on the *current* held-out split (test, or
val when test is empty), computed with fixed evaluation settings
(``pipeline.lm.EVAL_BATCH_SIZE``/``EVAL_NUM_STEPS``). A version's stored figure is used
when it was trained on this very dataset (its ``dataset_id`` tag); otherwise the model
is loaded from the registry and re-evaluated on the split (token ids mapped through the
two vocabularies; tokens it does not know count as ``<unk>``). Gate decisions are
serialized per model name by an ``flock`` on ``<root>/locks/gate-<name>.lock`` when the
storage root is local; with a remote root wrap ``promote_if_better`` in an
orchestrator-level concurrency limit (the Prefect task does).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline import storage
from pipeline.config import RunConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.launch import read_epochs

log = logging.getLogger(__name__)

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"  # the logged model's name inside the run

PROJECT_DIR = Path(__file__).resolve().parents[1]
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
# The pipeline modules a served model imports (pipeline.lm and everything it imports at
# load/generate/perplexity time). Only torch, numpy, pyarrow, pydantic and pyyaml are
# needed beyond them: all mlflow (or torch) dependencies.
SHIPPED_MODULES = ("__init__.py", "config.py", "errors.py", "models.py", "regularization.py", "generate.py",
                   "tokenizer.py", "evaluate.py", "lm.py")
EPOCH_METRICS = ("train_ppl", "val_ppl", "tokens_per_s", "grad_norm", "lr")


class RegistryError(PipelineError):
    """Something about tracking or registration is wrong (not retryable by default)."""


class TrainingFailedError(RegistryError):
    """The run directory holds a failed, diverged or unfinished training: nothing is registered."""


# ---------------------------------------------------------------------------- tracking URI


def tracking_uri(root: str | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db`` for a local storage root."""
    env = os.environ.get(ENV_TRACKING_URI)
    if env:
        return env
    root = storage.storage_root(root)
    if not storage.is_local(root):
        raise ConfigError(f"storage root {root} is not a local directory, so the default SQLite "
                          f"tracking store cannot live there: set {ENV_TRACKING_URI} (e.g. to an "
                          f"MLflow server, http://host:5000)")
    return "sqlite:///" + os.path.join(storage.local_path(root), DB_FILE)


def _sqlite_path(uri: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else path


def default_artifact_location(experiment: str, uri: str, root: str | None = None) -> str | None:
    """``<root>/mlartifacts/<experiment>`` for a SQLite store with a local root, else None
    (a tracking server decides where its artifacts go)."""
    root = storage.storage_root(root)
    if _sqlite_path(uri) is None or not storage.is_local(root):
        return None
    return os.path.join(storage.local_path(root), ARTIFACTS_DIR, experiment)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed), released on exit or process death."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


_READY: set[str] = set()


def ensure_tracking_db(uri: str | None = None, root: str | None = None) -> str:
    """Create (and migrate) a SQLite tracking database once, under a file lock; idempotent.

    Other URIs (a server, another database) are returned unchanged. Returns the URI.
    """
    uri = uri or tracking_uri(root)
    path = _sqlite_path(uri)
    if path is None or uri in _READY:
        return uri
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    artifacts = os.path.join(os.path.dirname(path), ARTIFACTS_DIR)
    with file_lock(path + ".lock"):
        # Opening the stores creates the tables and runs any pending migrations; under the lock
        # only one process ever does that on a given file.
        TrackingStore(uri, artifacts)
        RegistryStore(uri)
    _READY.add(uri)
    return uri


def configure(root: str | None = None) -> str:
    """Point MLflow's fluent API at our tracking/registry URI for the rest of the process.

    Note that ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` (and the
    registry one) to the environment. This module's own functions never call this: they
    use ``using_tracking``, which restores MLflow's globals and the environment afterwards.
    """
    import mlflow

    uri = ensure_tracking_db(tracking_uri(root), root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
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


def client(root: str | None = None):
    """An ``MlflowClient`` on our tracking and registry URI (the database created if new)."""
    from mlflow import MlflowClient

    uri = ensure_tracking_db(tracking_uri(root), root)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_name(preset: str) -> str:
    return f"rnnlm-{preset}"


def model_name(preset: str) -> str:
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


# ------------------------------------------------------------------------ run directories


def check_training_succeeded(run_dir: str) -> dict[str, Any]:
    """result.json of a successful training; TrainingFailedError otherwise.

    Refused: FAILED.json present; result.json, model.pt or model_config.json missing;
    a missing or non-finite validation perplexity in result.json.
    """
    failed = storage.join(run_dir, "FAILED.json")
    if storage.exists(failed):
        try:
            info = storage.read_json(failed)
        except Exception:  # noqa: BLE001 - unreadable is still a failure
            info = {}
        raise TrainingFailedError(f"training in {run_dir} failed ({info.get('reason', 'unknown reason')}: "
                                  f"{info.get('message', 'see FAILED.json')}); refusing to log or register it")
    try:
        result = storage.read_json(storage.join(run_dir, "result.json"))
    except FileNotFoundError:
        raise TrainingFailedError(f"{run_dir} has no result.json: training did not finish; "
                                  f"refusing to log or register it") from None
    except ValueError as e:
        raise TrainingFailedError(f"{run_dir}/result.json is corrupt: {e}") from None
    val = result.get("val_ppl")
    if not isinstance(val, (int, float)) or not math.isfinite(val):
        raise TrainingFailedError(f"training in {run_dir} has no finite validation perplexity "
                                  f"(val_ppl={val!r}); refusing to log or register it")
    for name in ("model.pt", "model_config.json"):
        if not storage.exists(storage.join(run_dir, name)):
            raise TrainingFailedError(f"{run_dir} has no {name}; refusing to log or register it")
    return result


def _check_finite(lm, run_dir: str) -> None:
    import torch

    bad = [k for k, v in lm.model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingFailedError(f"the weights in {run_dir}/model.pt are not finite ({', '.join(bad[:3])}); "
                                  f"refusing to log or register them")


def _load_lm(run_dir: str, dataset=None):
    """The run's LanguageModel; writes lm.json from ``dataset`` first if it is missing."""
    from pipeline.lm import LM_FILE, LanguageModel, write_lm_metadata

    if not storage.exists(storage.join(run_dir, LM_FILE)):
        if dataset is None:
            raise RegistryError(f"{run_dir} has no {LM_FILE}; call write_lm_metadata(run_dir, dataset)")
        write_lm_metadata(run_dir, dataset)
    lm = LanguageModel.from_dir(run_dir)
    _check_finite(lm, run_dir)
    return lm


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [{"d": 2}]}`` -> ``{"a.b": 1, "c.0.d": 2}``."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = json.dumps(obj) if isinstance(obj, (list, tuple)) else obj
    return out


def code_version() -> tuple[str, str]:
    """(version, source): the git commit of the project checkout, else the package version."""
    if (PROJECT_DIR / ".git").exists():
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip()
            if len(sha) == 40:
                return sha, "git"
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return importlib.metadata.version("rnnlm"), "package"
    except importlib.metadata.PackageNotFoundError:
        return "unknown", "none"


def plot_perplexity(epochs: list[dict[str, Any]], title: str = "") -> bytes:
    """PNG of train/val perplexity against epoch (d2l's Animator plot), without pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, style in (("train_ppl", "-"), ("val_ppl", "--")):
        points = [(e["epoch"], e[key]) for e in epochs if isinstance(e.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), style, marker="o" if len(points) < 20 else None, label=key.replace("_ppl", ""))
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def held_out_split(dataset) -> str:
    """"test", or "val" when the test split is too short to score; RegistryError if neither is."""
    for split in ("test", "val"):
        if dataset.manifest["splits"].get(split, {}).get("num_tokens", 0) >= 2:
            return split
    raise RegistryError(f"dataset {dataset.dataset_id} has neither a test nor a val split of at least 2 tokens")


# ----------------------------------------------------------------------------- logging


def log_training_run(run_dir: str, dataset, *, preset: str, config: RunConfig,
                     flow_run_id: str | None = None, flow_run_url: str | None = None,
                     samples: list[str] | None = None, sample_prefixes: list[str] | None = None,
                     run_key: str | None = None, root: str | None = None) -> str:
    """Log one finished training as an MLflow run in experiment ``rnnlm-<preset>``; return its id.

    Params: ``config`` flattened (``model.hidden_size``, ``train.lr``, ``data.sources.0.url``...).
    Metrics: every epoch of metrics.jsonl (step = epoch), ``final_val_ppl`` and
    ``final_test_ppl`` (fixed evaluation settings, the figures the gate compares).
    Artifacts: ``perplexity.png``, ``samples.txt``, ``vocab.json``, ``manifest.json``,
    ``lm.json``, ``result.json``, ``metrics.jsonl``. Tags: lineage (Prefect flow run, dataset,
    sources, code version). ``samples`` are texts logged as given; otherwise samples are
    generated (greedy and seeded sampling, 100 tokens) from ``sample_prefixes``, by default
    the first 10 tokens of the validation split. Raises TrainingFailedError for a failed run.

    Idempotent: the run is tagged ``rnnlm.run_key`` (``run_key``, default a hash of
    ``run_dir``), and a FINISHED run with the same key in the experiment is returned
    instead of logging again, so a retried orchestrator task does not duplicate it.
    """
    from mlflow.entities import Metric, Param, RunTag
    from pipeline.lm import EVAL_BATCH_SIZE, EVAL_NUM_STEPS

    result = check_training_succeeded(run_dir)
    lm = _load_lm(run_dir, dataset)
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

    version, version_source = code_version()
    manifest = dataset.manifest
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
    for i, src in enumerate(manifest.get("sources", [])):
        tags[f"data.source.{i}.uri"] = str(src.get("source"))
        tags[f"data.source.{i}.sha256"] = str(src.get("sha256"))
    run = c.create_run(experiment_id, run_name=f"{preset}-{flow_run_id or time.strftime('%Y%m%d-%H%M%S')}",
                       tags={k: v for k, v in tags.items() if v != ""})
    run_id = run.info.run_id
    try:
        params = {"preset": preset, **flatten(config.model_dump(mode="json"))}
        _log_batch(c, run_id, params=[Param(k, str(v)) for k, v in params.items()])

        epochs = read_epochs(run_dir)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(e[k]), now, int(e["epoch"])) for e in epochs for k in EPOCH_METRICS
                   if isinstance(e.get(k), (int, float)) and math.isfinite(e[k])]
        figures = {"final_val_ppl": None, "final_test_ppl": None}
        for split in ("val", "test"):
            ids = dataset.split(split)
            if len(ids) >= 2:
                figures[f"final_{split}_ppl"] = lm.perplexity(ids)
        for k in ("wall_s", "tokens_per_s", "epochs", "steps"):
            if isinstance(result.get(k), (int, float)):
                metrics.append(Metric(f"train_{k}" if not k.startswith("train") else k, float(result[k]), now, 0))
        metrics += [Metric(k, v, now, len(epochs)) for k, v in figures.items() if v is not None]
        _log_batch(c, run_id, metrics=metrics)
        _log_batch(c, run_id, tags=[RunTag("eval.batch_size", str(EVAL_BATCH_SIZE)),
                                    RunTag("eval.num_steps", str(EVAL_NUM_STEPS)),
                                    RunTag("train.finished", str(bool(result.get("finished"))).lower())])

        if samples is None:
            if sample_prefixes is None:
                val = dataset.split("val")
                first = [lm.vocab_tokens[i] for i in val[:10]] if len(val) else lm.vocab_tokens[1:2]
                from pipeline.generate import join_tokens

                sample_prefixes = [join_tokens(first, lm.level)]
            samples = []
            for prefix in sample_prefixes:
                samples.append(lm.generate(prefix, 100))
                samples.append(lm.generate(prefix, 100, temperature=1.0, seed=0))
        with tempfile.TemporaryDirectory() as tmp:
            files = {
                "perplexity.png": plot_perplexity(epochs, f"{preset} ({lm.model.cfg.cell})"),
                "samples.txt": ("\n\n".join(samples) + "\n").encode("utf-8"),
                "vocab.json": json.dumps(lm.vocab_tokens, ensure_ascii=False, indent=0).encode("utf-8"),
                "manifest.json": json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"),
                "lm.json": json.dumps(lm.meta, indent=2, sort_keys=True).encode("utf-8"),
                "result.json": json.dumps(result, indent=2, sort_keys=True).encode("utf-8"),
            }
            mj = storage.join(run_dir, "metrics.jsonl")
            if storage.exists(mj):
                files["metrics.jsonl"] = storage.read_bytes(mj)
            for name, data in files.items():
                Path(tmp, name).write_bytes(data)
            c.log_artifacts(run_id, tmp)
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")
    log.info("logged run %s (experiment %s): val ppl %s, test ppl %s", run_id, experiment_name(preset),
             figures["final_val_ppl"], figures["final_test_ppl"])
    return run_id


def _log_batch(c, run_id: str, *, params=(), metrics=(), tags=()) -> None:
    """MlflowClient.log_batch in chunks under MLflow's limits (100 params, 1000 items per call)."""
    params, metrics, tags = list(params), list(metrics), list(tags)
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[i:i + 1000])
    for i in range(0, len(tags), 100):
        c.log_batch(run_id, tags=tags[i:i + 100])


# ------------------------------------------------------------------------- registration


def pip_requirements() -> list[str]:
    """What a served model needs, as ranges around the installed versions."""
    def v(dist: str) -> tuple[int, ...]:
        text = importlib.metadata.version(dist).split("+")[0]
        return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())

    mlflow_v, torch_v = v("mlflow"), v("torch")
    reqs = [f"mlflow>={'.'.join(map(str, mlflow_v))},<{mlflow_v[0]}.{mlflow_v[1] + 1}",
            f"torch>={torch_v[0]}.{torch_v[1]},<{torch_v[0]}.{torch_v[1] + 1}"]
    for dist, pkg in (("numpy", "numpy"), ("pyarrow", "pyarrow"), ("pydantic", "pydantic"), ("pyyaml", "pyyaml")):
        major, minor = v(dist)[:2]
        reqs.append(f"{pkg}>={major}.{minor},<{major + 1}")
    return reqs


def stage_code(directory: str) -> str:
    """Copy the shipped ``pipeline`` modules into ``directory/pipeline``; return that path."""
    dest = os.path.join(directory, "pipeline")
    os.makedirs(dest)
    src = Path(__file__).parent
    for name in SHIPPED_MODULES:
        shutil.copy2(src / name, os.path.join(dest, name))
    return dest


def signature_and_example():
    from mlflow.models import infer_signature

    from pipeline.mlflow_model import DEFAULT_PARAMS

    # One unnamed string column: a list of prefixes, a DataFrame with a "prefix" column and
    # {"prefix": [...]} all pass MLflow's schema enforcement (a named column would refuse a list).
    example = ["time traveller"]
    signature = infer_signature(example, ["time traveller and the"], params=DEFAULT_PARAMS)
    return signature, example


@dataclass
class RegisteredVersion:
    name: str
    version: str
    model_uri: str  # models:/<name>/<version>
    run_id: str
    val_ppl: float | None
    test_ppl: float | None
    dataset_id: str


def register_model(run_id: str, run_dir: str, *, preset: str | None = None, name: str | None = None,
                   flow_run_id: str | None = None, root: str | None = None) -> RegisteredVersion:
    """Log the pyfunc into MLflow run ``run_id`` and register it as a new version of
    ``rnnlm-<preset>`` (or ``name``), alias ``challenger``.

    The logged model is self-contained: weights, config (``backend: torch``, whatever
    trained it), vocabulary and tokenizer as artifacts, the pipeline modules it needs
    as code. Version tags: ``val_ppl``, ``test_ppl``, ``dataset_id``,
    ``data_manifest_sha256``, ``flow_run_id``, ``code_version``, ``eval_batch_size``,
    ``eval_num_steps``, ``level``. Raises TrainingFailedError for a failed run directory.
    """
    import mlflow

    if (preset is None) == (name is None):
        raise ConfigError("register_model needs exactly one of preset= or name=")
    name = name or model_name(preset)
    check_training_succeeded(run_dir)
    lm = _load_lm(run_dir)
    c = client(root)
    run = c.get_run(run_id)
    tags_in, metrics = run.data.tags, run.data.metrics
    if tags_in.get("data.dataset_id") != lm.dataset_id:
        raise RegistryError(f"run {run_id} logged dataset {tags_in.get('data.dataset_id')}, but {run_dir} "
                            f"holds a model of dataset {lm.dataset_id}")
    existing = _versions_of_run(c, name, run_id)
    if existing:  # a retried task: the run's model is registered already
        mv = existing[0]
        log.info("run %s is already registered as %s version %s", run_id, name, mv.version)
        return RegisteredVersion(name, str(mv.version), f"models:/{name}/{mv.version}", run_id,
                                 _float(mv.tags.get("val_ppl")), _float(mv.tags.get("test_ppl")), lm.dataset_id)
    signature, example = signature_and_example()
    with tempfile.TemporaryDirectory() as tmp:
        files = lm.save(os.path.join(tmp, "artifacts"), backend="torch")
        code = stage_code(os.path.join(tmp, "code"))
        with using_tracking(root), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT, python_model=str(MODEL_CODE), artifacts=files, code_paths=[code],
                signature=signature, input_example=(example, {"num_tokens": 10, "seed": 0}),
                pip_requirements=pip_requirements(),
                metadata={"level": lm.level, "dataset_id": lm.dataset_id})
    version_tags = {
        "val_ppl": metrics.get("final_val_ppl"),
        "test_ppl": metrics.get("final_test_ppl"),
        "dataset_id": lm.dataset_id,
        "data_manifest_sha256": tags_in.get("data.manifest_sha256"),
        "flow_run_id": flow_run_id or tags_in.get("prefect.flow_run_id"),
        "flow_run_url": tags_in.get("prefect.flow_run_url"),
        "code_version": tags_in.get("code.version"),
        "eval_batch_size": tags_in.get("eval.batch_size"),
        "eval_num_steps": tags_in.get("eval.num_steps"),
        "level": lm.level,
    }
    with using_tracking(root):
        mv = mlflow.register_model(info.model_uri, name,
                                   tags={k: str(v) for k, v in version_tags.items() if v is not None})
    c.set_registered_model_alias(name, CHALLENGER, mv.version)
    c.update_model_version(name, mv.version, description=(
        f"{lm.model.cfg.cell} {lm.level}-level LM on dataset {lm.dataset_id}: "
        f"val ppl {_fmt(version_tags['val_ppl'])}, test ppl {_fmt(version_tags['test_ppl'])}. Awaiting the gate."))
    log.info("registered %s version %s (run %s)", name, mv.version, run_id)
    return RegisteredVersion(name, str(mv.version), f"models:/{name}/{mv.version}", run_id,
                             version_tags["val_ppl"], version_tags["test_ppl"], lm.dataset_id)


def _versions_of_run(c, name: str, run_id: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return sorted(c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"), key=lambda v: int(v.version))
    except MlflowException:
        return []


def _float(x: str | None) -> float | None:
    return None if x in (None, "") else float(x)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# -------------------------------------------------------------------------------- gate


@dataclass
class GateDecision:
    name: str
    version: str
    promoted: bool
    split: str  # the held-out split both figures are on
    dataset_id: str  # ... of this dataset
    candidate_ppl: float
    champion_version: str | None  # the champion before the decision
    champion_ppl: float | None
    champion_ppl_source: str | None  # "stored" | "re-evaluated" | None (no champion)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def gate_lock(name: str, root: str | None = None) -> Iterator[None]:
    """Serialize gate decisions for model ``name`` across processes on this machine.

    An ``flock`` on ``<root>/locks/gate-<name>.lock`` for a local storage root; a no-op
    (with a debug log) for a remote one, where the orchestrator's concurrency limit
    must do it.
    """
    root = storage.storage_root(root)
    if not storage.is_local(root):
        log.debug("storage root %s is remote: gate for %s relies on the orchestrator's lock", root, name)
        yield
        return
    with file_lock(os.path.join(storage.local_path(root), "locks", f"gate-{name}.lock")):
        yield


def load_version_lm(name: str, version: str, root: str | None = None):
    """The LanguageModel inside a registered version (loaded through mlflow.pyfunc)."""
    import mlflow

    with using_tracking(root):
        return mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model().lm


def version_perplexity(c, name: str, mv, dataset, split: str, root: str | None = None) -> tuple[float, str]:
    """(perplexity of version ``mv`` on ``dataset``'s ``split``, "stored" or "re-evaluated").

    The stored figure is used only when the version was trained on this dataset and
    evaluated with the current evaluation settings; otherwise the model is loaded and
    re-evaluated (and the figure cached in a tag ``eval.<dataset_id>.<split>_ppl``).
    """
    from pipeline.lm import EVAL_BATCH_SIZE, EVAL_NUM_STEPS

    tags = mv.tags
    same_eval = tags.get("eval_batch_size") == str(EVAL_BATCH_SIZE) and tags.get("eval_num_steps") == str(EVAL_NUM_STEPS)
    if same_eval and tags.get("dataset_id") == dataset.dataset_id and tags.get(f"{split}_ppl"):
        return float(tags[f"{split}_ppl"]), "stored"
    cache_key = f"eval.{dataset.dataset_id}.{split}_ppl.b{EVAL_BATCH_SIZE}"
    if tags.get(cache_key):
        return float(tags[cache_key]), "re-evaluated"
    lm = load_version_lm(name, str(mv.version), root)
    level = dataset.manifest["tokenizer"]["level"]
    if lm.level != level:
        raise RegistryError(f"{name} version {mv.version} is a {lm.level}-level model; dataset "
                            f"{dataset.dataset_id} is {level}-level: their perplexities are not comparable")
    ppl = lm.perplexity(dataset.split(split), vocab_tokens=dataset.vocab.tokens)
    c.set_model_version_tag(name, mv.version, cache_key, str(ppl))
    return ppl, "re-evaluated"


def promote_if_better(name: str, version: str | int, dataset, *, root: str | None = None,
                      lock: bool = True) -> GateDecision:
    """Make ``version`` the ``champion`` of ``name`` iff its held-out perplexity on ``dataset``
    beats the current champion's on the same split (or there is no champion).

    The split is ``dataset``'s test split (val if test is empty). A champion trained on
    other data is re-evaluated on this split first. The decision and both figures go
    into the version's tags (``gate.*``) and description. ``lock=False`` skips the
    file lock (when the caller already serializes gate decisions).
    """
    version = str(version)
    with (gate_lock(name, root) if lock else contextlib.nullcontext()):
        return _gate(client(root), name, version, dataset, root)


def _gate(c, name: str, version: str, dataset, root: str | None) -> GateDecision:
    from mlflow.exceptions import MlflowException

    split = held_out_split(dataset)
    candidate = c.get_model_version(name, version)
    cand_ppl, cand_source = version_perplexity(c, name, candidate, dataset, split, root)
    try:
        champion = c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None

    champ_ppl = champ_source = None
    if champion is None:
        promoted, reason = True, "no champion yet: the first version becomes champion"
    elif str(champion.version) == version:
        promoted, reason = True, "already the champion"
        champ_ppl, champ_source = cand_ppl, cand_source
    else:
        try:
            champ_ppl, champ_source = version_perplexity(c, name, champion, dataset, split, root)
        except RegistryError as e:
            champ_ppl, champ_source = None, None
            promoted, reason = False, f"champion not comparable ({e}); promote by hand if intended"
        else:
            if not math.isfinite(champ_ppl):
                promoted = True
                reason = f"champion v{champion.version} has a non-finite {split} perplexity"
            else:
                promoted = cand_ppl < champ_ppl
                reason = (f"{split} perplexity {cand_ppl:.4f} {'<' if promoted else '>='} champion "
                          f"v{champion.version}'s {champ_ppl:.4f} ({champ_source})")
    decision = GateDecision(name=name, version=version, promoted=promoted, split=split,
                            dataset_id=dataset.dataset_id, candidate_ppl=cand_ppl,
                            champion_version=None if champion is None else str(champion.version),
                            champion_ppl=champ_ppl, champion_ppl_source=champ_source, reason=reason)
    tags = {"gate.decision": "promoted" if promoted else "rejected", "gate.split": split,
            "gate.dataset_id": dataset.dataset_id, "gate.candidate_ppl": str(cand_ppl),
            "gate.champion_version": decision.champion_version or "",
            "gate.champion_ppl": "" if champ_ppl is None else str(champ_ppl),
            "gate.champion_ppl_source": champ_source or "", "gate.reason": reason,
            "gate.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)
    if promoted:
        c.set_registered_model_alias(name, CHAMPION, version)
    old = candidate.description or ""
    verdict = (f"Gate ({tags['gate.time']}): {'PROMOTED to champion' if promoted else 'not promoted'}: {reason}. "
               f"Candidate {split} ppl {cand_ppl:.4f}; champion "
               f"{'none' if champion is None else 'v' + str(champion.version)} {_fmt(champ_ppl)} "
               f"on dataset {dataset.dataset_id}.")
    c.update_model_version(name, version, description=(old.replace("Awaiting the gate.", "").strip() + "\n" + verdict).strip())
    log.info("gate %s v%s: %s", name, version, verdict)
    return decision


# ----------------------------------------------------------------------------- consumers


def load_champion(name: str, root: str | None = None):
    """``mlflow.pyfunc.load_model("models:/<name>@champion")`` on our tracking URI."""
    import mlflow

    with using_tracking(root):
        return mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")


def _is_model_uri(text: str) -> bool:
    return text.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def generate_from_uri(model_uri_or_run_dir: str, prefix: str, num_tokens: int = 50, temperature: float = 0.0,
                      top_k: int | None = None, seed: int | None = None, root: str | None = None) -> str:
    """Generate from a run directory or an MLflow model URI (``models:/NAME@champion``,
    ``models:/NAME/3``, ``runs:/ID/model``); returns the prefix followed by the continuation.

    ``seed=None`` with ``temperature > 0`` draws a fresh random seed.
    """
    if _is_model_uri(model_uri_or_run_dir):
        import mlflow

        with using_tracking(root):
            model = mlflow.pyfunc.load_model(model_uri_or_run_dir)
        params = {"num_tokens": int(num_tokens), "temperature": float(temperature), "top_k": int(top_k or 0),
                  "seed": -1 if seed is None else int(seed)}
        return model.predict([prefix], params=params)[0]
    from pipeline.lm import LanguageModel

    if not storage.exists(storage.join(model_uri_or_run_dir, "model.pt")):
        raise ConfigError(f"{model_uri_or_run_dir} is neither a run directory (no model.pt) nor a "
                          f"models:/ or runs:/ URI")
    lm = LanguageModel.from_dir(model_uri_or_run_dir)
    return lm.generate(prefix, num_tokens, temperature=temperature, top_k=top_k, seed=seed)
