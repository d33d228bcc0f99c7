"""The MLflow model: a self-contained pyfunc, registered as a new version of ``rnnlm-<preset>``.

    mv = register_model(run_id, run_dir, preset="timemachine-char")   # alias "challenger"

The logged model carries the weights, config (``backend: torch``), vocabulary and
tokenizer as artifacts and the ``pipeline`` modules it needs as code
(``SHIPPED_MODULES``), so a consumer with only mlflow and torch can load it.
Registration refuses failed trainings (``pipeline.registry.run_checks``) and is idempotent: a
training run (its directory and the sha256 of its ``model.pt``, or its MLflow run) is
registered at most once; registering it again returns that version with ``created=False``.
The check and the registration are one step under ``<root>/locks/register-<name>.lock`` (a
local root), so two processes registering the same training run at once create one version;
across hosts the caller serializes them (the Prefect task holds ``rnnlm-gate``).
Any registry error fails closed (``RegistryUnavailableError``, retryable): a failed
search never reads as "not registered yet".
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline import storage
from pipeline.errors import ConfigError, RegistryError
from pipeline.registry.run_checks import check_training_succeeded, load_run_lm
from pipeline.registry.tracking import client, model_lock, registry_access, using_tracking

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"  # the logged model's name inside the run
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
# The pipeline modules a served model imports (pipeline.model.lm and everything it imports at
# load/generate/perplexity time), relative to the package. Only torch, numpy, pyarrow, pydantic
# and pyyaml are needed beyond them: all mlflow (or torch) dependencies.
SHIPPED_MODULES = ("__init__.py", "config.py", "errors.py",
                   "data/__init__.py", "data/tokenizer.py",
                   "model/__init__.py", "model/cells.py", "model/models.py", "model/regularization.py",
                   "model/generate.py", "model/evaluate.py", "model/lm.py")


def model_name(preset: str) -> str:
    return f"rnnlm-{preset}"


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
    src = Path(__file__).parents[1]  # the pipeline package
    for name in SHIPPED_MODULES:
        os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
        shutil.copy2(src / name, os.path.join(dest, name))
    return dest


def input_example() -> tuple[list[str], dict]:
    """MLflow infers the model's signature from this example (``predict`` is typed
    ``TypeFromExample``): one unnamed string column, and the params with their defaults."""
    from pipeline.registry.mlflow_model import DEFAULT_PARAMS

    return ["time traveller"], dict(DEFAULT_PARAMS)


@dataclass
class RegisteredVersion:
    name: str
    version: str
    model_uri: str  # models:/<name>/<version>
    run_id: str
    val_ppl: float | None
    test_ppl: float | None
    dataset_id: str
    created: bool = True  # False: this training run was registered before, nothing new


@registry_access("registering a model version")
def register_model(run_id: str, run_dir: str, *, preset: str | None = None, name: str | None = None,
                   flow_run_id: str | None = None, root: str | None = None) -> RegisteredVersion:
    """Log the pyfunc into MLflow run ``run_id`` and register it as a new version of
    ``rnnlm-<preset>`` (or ``name``), alias ``challenger``.

    Version tags: ``val_ppl``, ``test_ppl``, ``dataset_id``, ``data_manifest_sha256``,
    ``flow_run_id``, ``code_version``, ``eval_batch_size``, ``eval_num_steps``, ``level``,
    ``tokenizer`` and ``vocab_sha256`` (what the gate compares), ``run_dir`` and
    ``model_sha256`` (the training run's identity). Raises UnregistrableRunError for a
    failed run directory, RegistryUnavailableError (retryable) when MLflow fails.
    """
    if (preset is None) == (name is None):
        raise ConfigError("register_model needs exactly one of preset= or name=")
    name = name or model_name(preset)
    check_training_succeeded(run_dir)
    lm = load_run_lm(run_dir)
    c = client(root)
    run = c.get_run(run_id)
    tags_in, metrics = run.data.tags, run.data.metrics
    if tags_in.get("data.dataset_id") != lm.dataset_id:
        raise RegistryError(f"run {run_id} logged dataset {tags_in.get('data.dataset_id')}, but {run_dir} "
                            f"holds a model of dataset {lm.dataset_id}")
    model_sha256 = storage.sha256_bytes(storage.read_bytes(storage.join(run_dir, "model.pt")))
    # "Already registered?" and the registration are one step: two flows registering the same
    # training run at once must not both find it absent (the Prefect task adds a lock across hosts).
    with model_lock(name, "register", root):
        existing = _registered_version(c, name, run_id, str(run_dir), model_sha256)
        if existing is not None:  # a retried task, an unchanged nightly, a concurrent run: nothing new
            log.info("nothing new: training run %s (MLflow run %s) is already registered as %s version %s",
                     run_dir, existing.run_id, name, existing.version)
            return RegisteredVersion(name, str(existing.version), f"models:/{name}/{existing.version}",
                                     existing.run_id, _float(existing.tags.get("val_ppl")),
                                     _float(existing.tags.get("test_ppl")), lm.dataset_id, created=False)
        mv = _register(c, lm, name, run_id, run_dir, tags_in, metrics, model_sha256, flow_run_id, root)
    log.info("registered %s version %s (run %s)", name, mv.version, run_id)
    return RegisteredVersion(name, str(mv.version), f"models:/{name}/{mv.version}", run_id,
                             metrics.get("final_val_ppl"), metrics.get("final_test_ppl"), lm.dataset_id)


def _register(c, lm, name: str, run_id: str, run_dir: str, tags_in: dict, metrics: dict, model_sha256: str,
              flow_run_id: str | None, root: str | None):
    """Log the pyfunc into the run and register it as a new version, alias challenger; the version."""
    import mlflow

    model_uri = _log_model(lm, run_id, root)
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
        "tokenizer": json.dumps(lm.meta["tokenizer"], sort_keys=True),
        "vocab_sha256": lm.meta["vocab_sha256"],
        "run_dir": str(run_dir),
        "model_sha256": model_sha256,
    }
    with using_tracking(root):
        mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in version_tags.items() if v is not None})
    c.set_registered_model_alias(name, CHALLENGER, mv.version)
    c.update_model_version(name, mv.version, description=(
        f"{lm.model.cfg.cell} {lm.level}-level LM on dataset {lm.dataset_id}: "
        f"val ppl {fmt_ppl(version_tags['val_ppl'])}, test ppl {fmt_ppl(version_tags['test_ppl'])}. "
        f"Awaiting the gate."))
    return mv


def _log_model(lm, run_id: str, root: str | None) -> str:
    """Log the self-contained pyfunc into MLflow run ``run_id``; its model URI."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        files = lm.save(os.path.join(tmp, "artifacts"), backend="torch")
        code = stage_code(os.path.join(tmp, "code"))
        with using_tracking(root), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT, python_model=str(MODEL_CODE), artifacts=files, code_paths=[code],
                input_example=input_example(),
                pip_requirements=pip_requirements(),
                metadata={"level": lm.level, "dataset_id": lm.dataset_id})
    return info.model_uri


def _registered_version(c, name: str, run_id: str, run_dir: str, model_sha256: str):
    """The oldest version of ``name`` registered from this MLflow run, or from this run directory
    with these very weights; None when the registry positively holds none (errors propagate)."""
    same_run = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    same_model = [mv for mv in c.search_model_versions(f"name = '{name}' and tags.`model_sha256` = '{model_sha256}'")
                  if mv.tags.get("run_dir") == run_dir]
    found = sorted([*same_run, *same_model], key=lambda mv: int(mv.version))
    return found[0] if found else None


def _float(x: str | None) -> float | None:
    return None if x in (None, "") else float(x)


def fmt_ppl(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
