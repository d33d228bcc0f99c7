"""The ``retrain`` flow: the whole chain, prepare-data -> train -> register (MLflow + gate)."""

from __future__ import annotations

import time
from typing import Any, Optional, Union

from prefect import flow

from flows.prepare_data import prepare_data_flow
from flows.dispatch import dispatch_stages
from flows.run_context import flow_run_id, flow_run_url, registry_preset, resolve_config
from flows.task_runners import task_runner_for
from flows.train import train_flow
from pipeline.config import RunConfig
from pipeline.sweep import SweepConfig, load_sweep
from pipeline.store.leases import leased
from tasks.caching import bind
from tasks.options import PipelineOptions
from tasks.register import log_sweep, register_model


@flow(name="retrain", validate_parameters=True)
def retrain_flow(config: Optional[RunConfig] = None, preset: Optional[str] = None,
                 overrides: Optional[list[str]] = None,
                 options: PipelineOptions = PipelineOptions(),
                 sweep: Optional[Union[SweepConfig, str]] = None) -> dict[str, Any]:
    """Raw text to an evaluated model, registered in MLflow as ``rnnlm-<preset>``.

    ``config`` (a RunConfig) wins; else ``preset`` (a preset name or a YAML path, default
    ``timemachine-char``); ``overrides`` are ``section.key=value`` strings on top.
    A failed or diverged training raises before registration, so it never registers.

    ``options.dispatch``: ``"local"`` (default) runs both stages as subflows in this
    process; ``"deployments"`` runs each as a flow run of its deployment
    (``options.prepare_deployment`` / ``options.train_deployment``) on that deployment's
    work pool and waits for it (``flows.dispatch.dispatch_stages``); registration stays here.

    ``options.pin_vocab="champion"``: the vocabulary is pinned to the current champion's
    (``pipeline.registry.champion_vocab``), or built afresh when there is no champion yet.

    ``sweep`` (a SweepConfig or the path of a sweep file): several trials on top of the config
    (``flows.sweep``); the best by validation perplexity is registered and gated, every trial is
    logged in MLflow under one parent run, and the result holds the table of trials.
    """
    started = time.perf_counter()
    cfg = resolve_config(config, preset, overrides)
    if options.pin_vocab == "champion":
        from pipeline.registry.champion_vocab import pin_to_champion
        from pipeline.registry.packaging import model_name

        cfg = pin_to_champion(cfg, model_name(registry_preset(config, preset)), options.store_root())

    # The lease tells a gc running meanwhile what this run uses (pipeline.store.leases).
    if isinstance(sweep, str):
        sweep = load_sweep(sweep)
    with leased(options.store_root(), flow_run_id()) as lease:
        if sweep is not None:
            return _retrain_sweep(cfg, sweep, options, lease, registry_preset(config, preset), started)
        if options.dispatch == "deployments":
            dataset, trained = dispatch_stages(cfg, options)
        else:
            dataset = prepare_data_flow.with_options(task_runner=task_runner_for(options))(data=cfg.data, options=options)
            lease.add(datasets=(dataset["dataset_id"],))
            trained = train_flow(dataset=dataset, model=cfg.model, training=cfg.train, options=options)
        placement = {name: {k: part.pop(k) for k in ("deployment", "work_pool_name") if k in part}
                     for name, part in (("prepare-data", dataset), ("train", trained))}

        lease.add(datasets=(dataset["dataset_id"],), runs=(trained["run"]["id"],))
        registered = None
        if options.register_model:
            registered = bind(register_model, options)(
                trained["run"], trained["evaluation"], dataset, cfg.model_dump(mode="json"),
                preset=registry_preset(config, preset), root=options.store_root(),
                flow_run_id=flow_run_id(), flow_run_url=flow_run_url())
    stages = {**dataset.pop("stages"), **trained["stages"]}
    return {"flow_run_id": flow_run_id(), "subflow_run_ids": [dataset.pop("flow_run_id"), trained["flow_run_id"]],
            "config": cfg.model_dump(mode="json"), "dataset": dataset, "run": trained["run"],
            "evaluation": trained["evaluation"], "registered": registered, "stages": stages,
            "dispatch": options.dispatch, "placement": placement, "wall_s": time.perf_counter() - started}


def _retrain_sweep(cfg: RunConfig, sweep: SweepConfig, options: PipelineOptions, lease, preset: str,
                   started: float) -> dict[str, Any]:
    """``retrain`` with a sweep: the trials (``flows.sweep``), then the best through registration and the gate."""
    from prefect.artifacts import create_markdown_artifact

    from flows.reports import sweep_markdown
    from flows.sweep import run_sweep

    found = run_sweep(cfg, sweep, options, lease)
    dataset, run, evaluation = found["dataset"], found["run"], found["evaluation"]
    lease.add(runs=tuple(row["run_dir"].rstrip("/").rsplit("/", 1)[-1] for row in found["trials"] if row["run_dir"]))
    create_markdown_artifact(key="rnnlm-sweep", markdown=sweep_markdown(found["trials"]),
                             description=f"sweep of {len(found['trials'])} trials: best {found['best']}")
    registered = None
    if options.register_model:
        parent = bind(log_sweep, options)(found["trials"], found["key"], preset, root=options.store_root(),
                                          flow_run_id=flow_run_id())
        registered = bind(register_model, options)(
            run, evaluation, dataset, found["config"].model_dump(mode="json"), preset=preset,
            root=options.store_root(), flow_run_id=flow_run_id(), flow_run_url=flow_run_url(), parent_run_id=parent)
        registered["sweep_run_id"] = parent
    return {"flow_run_id": flow_run_id(), "subflow_run_ids": found["subflow_run_ids"],
            "config": found["config"].model_dump(mode="json"), "dataset": dataset, "run": run,
            "evaluation": evaluation, "registered": registered, "stages": found["stages"],
            "dispatch": options.dispatch, "placement": {},
            "sweep": {"best": found["best"], "trials": found["trials"]}, "wall_s": time.perf_counter() - started}
