"""Distributed mode: each stage of ``retrain`` as a flow run of its deployment, on that deployment's work pool."""

from __future__ import annotations

from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import ConfigError, PipelineError
from tasks.options import PipelineOptions


class DispatchError(PipelineError):
    """A stage dispatched to a deployment did not complete (failed, crashed, cancelled, timed out)."""

    retryable = True


def dispatch_stages(cfg: RunConfig, options: PipelineOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """``retrain`` with ``options.dispatch == "deployments"``: each stage is a flow run of its deployment.

    The data stage runs as ``options.prepare_deployment`` (pool ``cpu``), training as
    ``options.train_deployment`` (pool ``gpu``), each on whichever worker polls that pool,
    linked to this flow run as subflows (``as_subflow=True``). Data moves as URIs on the
    shared storage root; what a child returns (the dataset manifest, the run manifest) is
    read back from its persisted flow result, which the workers write to shared storage
    (``rnnlm worker`` sets ``PREFECT_RESULTS_*``). Children get the same options with
    ``dispatch="local"`` and, unless the parent was given one, no ``root``: each resolves
    ``$RNNLM_STORAGE`` on its own host. Returns ``(dataset, trained)`` shaped like the
    local subflows' results.
    """
    child = options.model_copy(update={"dispatch": "local"}).model_dump(mode="json")
    prepared = dispatch(options.prepare_deployment, {"data": cfg.data.model_dump(mode="json"), "options": child},
                        options, stage="prepare-data")
    dataset = {k: v for k, v in prepared.items() if k not in ("stages", "flow_run_id")}
    trained = dispatch(options.train_deployment,
                       {"dataset": dataset, "model": cfg.model.model_dump(mode="json"),
                        "training": cfg.train.model_dump(mode="json"), "options": child},
                       options, stage="train")
    return prepared, trained


def dispatch(deployment: str, parameters: dict[str, Any], options: PipelineOptions, *, stage: str) -> dict[str, Any]:
    """Run ``deployment`` as a subflow of this flow run, wait for it, return its (persisted) result.

    Refuses up front what would deadlock: a child on this run's own work pool when that
    pool's concurrency limit leaves no slot for it. A child still running after
    ``options.dispatch_timeout_s`` is cancelled and the stage fails (retryable).
    """
    from prefect import get_run_logger
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    pool = check_dispatch_target(deployment)
    logger.info("dispatching %s to deployment %s (work pool %s)", stage, deployment, pool)
    run = run_deployment(deployment, parameters=parameters, timeout=options.dispatch_timeout_s,
                         poll_interval=options.dispatch_poll_s, as_subflow=True)
    state = run.state
    if state is None or not state.is_final():
        cancel_flow_run(run.id)
        raise DispatchError(f"{stage}: flow run {run.name} ({run.id}) of deployment {deployment} was still "
                            f"{state.name if state else 'unknown'} after {options.dispatch_timeout_s:.0f} s "
                            f"(is a worker polling work pool {pool}?); cancelled it")
    if not state.is_completed():
        raise DispatchError(f"{stage}: flow run {run.name} ({run.id}) of deployment {deployment} ended "
                            f"{state.name}: {state.message or 'no message'}")
    logger.info("%s: flow run %s (%s) completed on work pool %s", stage, run.name, run.id, run.work_pool_name or pool)
    try:
        result = state.result()
    except Exception as e:  # noqa: BLE001 (MissingResult, a path this host cannot read, ...)
        raise ConfigError(
            f"{stage}: flow run {run.id} completed but its result cannot be read here ({type(e).__name__}: {e}). "
            f"The workers must persist flow results on storage this host can read: start them with "
            f"`rnnlm worker --pool NAME` (sets PREFECT_RESULTS_PERSIST_BY_DEFAULT and the results location "
            f"under $RNNLM_STORAGE), see deployments/README.md") from e
    if not isinstance(result, dict):
        raise DispatchError(f"{stage}: flow run {run.id} returned {type(result).__name__}, not a manifest dict")
    return {**result, "flow_run_id": str(result.get("flow_run_id") or run.id),
            "work_pool_name": run.work_pool_name or pool, "deployment": deployment}


def check_dispatch_target(deployment: str) -> str | None:
    """The child deployment's work pool; a ConfigError if it does not exist or if dispatching
    to it from this run would starve (same pool as this run, pool limit below 2)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.runtime import deployment as this_deployment

    with get_client(sync_client=True) as client:
        try:
            child = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise ConfigError(f"deployment {deployment} not found on the Prefect server: "
                              f"run `rnnlm deploy` (or `make deploy`) first") from None
        parent_id = this_deployment.get_id()
        if not parent_id or not child.work_pool_name:
            return child.work_pool_name
        parent = client.read_deployment(parent_id)
        if parent.work_pool_name != child.work_pool_name:
            return child.work_pool_name
        pool = client.read_work_pool(child.work_pool_name)
    if pool.concurrency_limit is not None and pool.concurrency_limit < 2:
        raise ConfigError(
            f"deployment {deployment} runs on work pool {pool.name}, the pool this flow run occupies, and that "
            f"pool's concurrency limit is {pool.concurrency_limit}: the child could never start while this run "
            f"waits for it. Run retrain on its own pool (deployments/prefect.yaml: pool 'control') or raise the limit")
    from prefect import get_run_logger

    get_run_logger().warning("deployment %s shares work pool %s with this run: each waiting parent holds a slot "
                             "of the pool's limit (%s)", deployment, pool.name, pool.concurrency_limit)
    return child.work_pool_name


def cancel_flow_run(flow_run_id) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Cancelling(message="the parent retrain stopped waiting"), force=True)
    except Exception:  # noqa: BLE001 (best effort: the parent is failing anyway)
        pass
