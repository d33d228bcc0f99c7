"""Register a trained model in MLflow and run the champion/challenger gate.

Not cached: registration is a side effect. It is idempotent instead: the MLflow run is
keyed by the run directory, a training run (run directory + model sha256, or MLflow run)
that is already registered returns its version and its recorded gate decision, so a retried
task or a nightly run whose inputs did not change registers nothing new (``new_version``
false in the result, and the log says so). "Already registered?" and the registration are one
step under the same one-slot limit, so two runs of one training (two processes, two hosts
on one Prefect server) register it once. A registry error fails closed
(``RegistryUnavailableError``): the task fails and is retried, no alias moves. Gate decisions are serialized across every flow
run and host by a Prefect global concurrency limit of one slot (alias moves are
last-writer-wins), on top of ``pipeline.registry.gate``'s file lock for local stores.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.concurrency.sync import concurrency

from tasks.retries import retry_if_retryable

GATE_LIMIT = "rnnlm-gate"


def ensure_gate_limit(name: str = GATE_LIMIT) -> None:
    """Create the one-slot global concurrency limit the gate runs under, if missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it first
                pass


@task(name="register_model", cache_policy=None, persist_result=False, tags=["register"],
      retries=2, retry_delay_seconds=10, retry_condition_fn=retry_if_retryable)
def register_model(run: dict[str, Any], evaluation: dict[str, Any], dataset: dict[str, Any],
                   config: dict[str, Any], preset: str, root: str | None = None,
                   flow_run_id: str | None = None, flow_run_url: str | None = None,
                   parent_run_id: str | None = None) -> dict[str, Any]:
    """Log the run, register a new version of ``rnnlm-<preset>`` (alias challenger), gate it
    (``config.gate.on_incomparable`` decides when the champion is not comparable).
    ``parent_run_id``: the MLflow run of the sweep this run won (its run is nested under it)."""
    from pipeline.config import RunConfig
    from pipeline.registry.gate import promote_if_better
    from pipeline.registry.packaging import register_model as register_version
    from pipeline.data.shards import open_dataset
    from pipeline.registry.run_logging import log_training_run
    from pipeline.registry.tracking import tracking_uri

    logger = get_run_logger()
    ds = open_dataset(dataset["uri"])
    cfg = RunConfig.model_validate(config)
    mlflow_run = log_training_run(
        run["run_dir"], ds, preset=preset, config=cfg, root=root,
        flow_run_id=flow_run_id, flow_run_url=flow_run_url, samples=[s["text"] for s in evaluation["samples"]],
        held_out={k: evaluation.get(k) for k in ("val_ppl", "test_ppl")},  # the one evaluation's figures
        parent_run_id=parent_run_id)
    ensure_gate_limit()
    # "already registered?" + registering under the one slot every host shares (the file lock
    # inside register_version covers only this machine's processes on a local root)
    with concurrency(GATE_LIMIT, occupy=1, strict=True):
        version = register_version(mlflow_run, run["run_dir"], preset=preset, flow_run_id=flow_run_id, root=root)
    if version.created:
        logger.info("registered %s version %s (challenger), MLflow run %s", version.name, version.version, mlflow_run)
    else:
        logger.info("nothing new to register: this training run is already %s version %s", version.name, version.version)
    with concurrency(GATE_LIMIT, occupy=1, strict=True):
        decision = promote_if_better(version.name, version.version, ds, root=root,
                                     on_incomparable=cfg.gate.on_incomparable)
    logger.info("gate%s: %s", " (decided before)" if decision.decided_before else "", decision.reason)
    return {"registered": True, "new_version": version.created, "name": version.name, "version": version.version,
            "model_uri": version.model_uri, "mlflow_run_id": mlflow_run, "tracking_uri": tracking_uri(root),
            "gate": decision.to_dict()}


@task(name="log_sweep", cache_policy=None, persist_result=False, tags=["register"],
      retries=2, retry_delay_seconds=10, retry_condition_fn=retry_if_retryable)
def log_sweep(trials: list[dict[str, Any]], sweep_key: str, preset: str, root: str | None = None,
              flow_run_id: str | None = None) -> str:
    """Log a sweep's trials in MLflow, nested under one parent run; returns the parent's id (once per sweep_key)."""
    from pipeline.registry.sweep_logging import log_sweep as log_trials

    parent = log_trials(preset, sweep_key, trials, root=root, flow_run_id=flow_run_id)
    get_run_logger().info("sweep logged in MLflow: parent run %s, %d trials", parent, len(trials))
    return parent
