"""A sweep inside ``retrain``: the data stage once per distinct data config, each trial a cached,
retryable training stage, successive halving between rungs, the best trial evaluated and returned.

Trials train ``sweep.trials_per_device`` at a time as tasks of this flow run (one GPU shared, or
the CPU cores split between them: ``RNNLM_NUM_THREADS`` per trial); under
``options.dispatch="deployments"`` each trial is a flow run of the train deployment instead, all
dispatched at once: the train pool's workers and limit decide how many run together, and where. A trial that fails (diverges, a bad value only training finds) is recorded as
failed; the sweep fails only when every trial does, with the first trial's error.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from prefect import get_run_logger

from pipeline.config import RunConfig
from pipeline.sweep import SweepConfig, Trial, best_trial, expand, rung_budgets, survivors
from pipeline.training.cpu_threads import THREADS_ENV, usable_cpus
from tasks.caching import bind
from tasks.options import PipelineOptions
from tasks.retries import retry_if_retryable
from tasks.train import TerminationGuard, evaluate_model, train_model


def cpu_share(trials_per_device: int) -> int | None:
    """Threads per trial when several share the host's cores (None: one trial, or ``RNNLM_NUM_THREADS`` says)."""
    if trials_per_device == 1 or os.environ.get(THREADS_ENV):
        return None
    return max(1, len(usable_cpus()) // trials_per_device)


def run_sweep(cfg: RunConfig, sweep: SweepConfig, options: PipelineOptions, lease) -> dict[str, Any]:
    """Every trial of ``sweep`` on ``cfg``; returns the best's ``dataset``, ``run``, ``evaluation``,
    ``config``, the table of ``trials``, the ``stages`` and the ``subflow_run_ids``."""
    logger = get_run_logger()
    trials = expand(sweep, cfg)  # every trial validated before anything runs
    logger.info("sweep: %d trials, %d at a time%s", len(trials), sweep.trials_per_device,
                f", successive halving from {sweep.halving.first_rung_steps} steps" if sweep.halving else "")
    stages: dict[str, list[str]] = {}
    subflows: list[str] = []
    datasets = _prepare(trials, options, lease, stages, subflows)

    table = {t.id: {"id": t.id, "overrides": t.overrides, "status": "pending", "run_dir": None, "steps": None,
                    "resumed_from_step": None, "val_ppl": None, "test_ppl": None, "error": None} for t in trials}
    outcome: dict[str, dict[str, Any]] = {}  # trial id -> {"run", "evaluation", "exception"}
    budgets = rung_budgets(sweep.halving, cfg.train.max_steps, len(trials)) if sweep.halving else [None]
    alive = list(trials)
    with TerminationGuard(options.grace_s):
        for rung, budget in enumerate(budgets):
            last = rung == len(budgets) - 1
            trained = _train(alive, datasets, None if last else budget, sweep, options, stages, subflows, evaluate=last)
            scores = {}
            for t in alive:
                got = outcome[t.id] = trained[t.id]
                row = table[t.id]
                if got.get("exception") is not None:
                    row.update(status="failed", error=str(got["exception"]).splitlines()[0][:300])
                    scores[t.id] = None
                    continue
                run = got["run"]
                row.update(status="finished", run_dir=run["run_dir"], steps=run.get("steps"), val_ppl=run.get("val_ppl"),
                           resumed_from_step=(run.get("resumed_from") or {}).get("step"))
                if got.get("evaluation"):
                    row.update(val_ppl=got["evaluation"]["val_ppl"], test_ppl=got["evaluation"]["test_ppl"])
                scores[t.id] = row["val_ppl"]
            if not last:
                keep = survivors(scores, sweep.halving.eta)
                for tid in scores:
                    if tid not in keep and table[tid]["status"] != "failed":
                        table[tid]["status"] = f"stopped at {budget} steps"
                logger.info("sweep rung %d (%d steps): %d of %d trials go on: %s", rung, budget, len(keep),
                            len(scores), ", ".join(keep) or "none")
                alive = [t for t in alive if t.id in keep]
                if not alive:
                    break

    finished = {tid: row["val_ppl"] for tid, row in table.items() if row["status"] == "finished"}
    best = best_trial(finished)
    if best is None:
        first = next(o["exception"] for o in outcome.values() if o.get("exception") is not None)
        logger.error("sweep: every trial failed")
        raise first
    table[best]["status"] = "best"
    logger.info("sweep: best trial %s, validation perplexity %.3f", best, table[best]["val_ppl"])
    trial = next(t for t in trials if t.id == best)
    return {"dataset": datasets[_data_key(trial)], "run": outcome[best]["run"],
            "evaluation": outcome[best]["evaluation"], "config": trial.config, "trials": list(table.values()),
            "best": best, "key": sweep_key(table), "stages": stages, "subflow_run_ids": subflows}


def sweep_key(table: dict[str, dict[str, Any]]) -> str:
    """What the sweep found (trials, their runs, outcomes): the same inputs re-run log nothing new."""
    rows = [{k: row[k] for k in ("id", "overrides", "status", "run_dir", "steps", "val_ppl")} for row in table.values()]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _data_key(trial: Trial) -> str:
    return json.dumps(trial.config.data.model_dump(mode="json"), sort_keys=True)


def _prepare(trials: list[Trial], options: PipelineOptions, lease, stages, subflows) -> dict[str, dict[str, Any]]:
    """The data stage once per distinct data config (each cached like any other)."""
    from flows.dispatch import dispatch
    from flows.prepare_data import prepare_data_flow
    from flows.task_runners import task_runner_for

    datasets: dict[str, dict[str, Any]] = {}
    for t in trials:
        key = _data_key(t)
        if key in datasets:
            continue
        if options.dispatch == "deployments":
            child = options.model_copy(update={"dispatch": "local"}).model_dump(mode="json")
            dataset = dispatch(options.prepare_deployment, {"data": t.config.data.model_dump(mode="json"),
                                                            "options": child}, options, stage="prepare-data")
            for k in ("deployment", "work_pool_name"):
                dataset.pop(k, None)
        else:
            dataset = prepare_data_flow.with_options(task_runner=task_runner_for(options))(data=t.config.data,
                                                                                          options=options)
        for name, states in dataset.pop("stages", {}).items():
            stages.setdefault(name, []).extend(states)
        subflows.append(dataset.pop("flow_run_id"))
        lease.add(datasets=(dataset["dataset_id"],))
        datasets[key] = dataset
    return datasets


def _budgeted(trial: Trial, budget: int | None) -> RunConfig:
    """The trial's config with a rung's step budget (None: its own budget)."""
    own = trial.config.train.max_steps
    if budget is None or (own is not None and own <= budget):
        return trial.config
    return trial.config.model_copy(update={"train": trial.config.train.model_copy(update={"max_steps": budget})})


def _train(trials: list[Trial], datasets, budget: int | None, sweep: SweepConfig, options: PipelineOptions,
           stages, subflows, *, evaluate: bool) -> dict[str, dict[str, Any]]:
    """Train ``trials`` to ``budget``, ``sweep.trials_per_device`` at a time; evaluate them if ``evaluate``."""
    if options.dispatch == "deployments":
        return _dispatch_trials(trials, datasets, budget, options, stages, subflows)
    trainer = bind(train_model, options, retries=options.train_retries, retry_delay_seconds=options.train_retry_delay_s,
                   retry_condition_fn=retry_if_retryable)
    evaluator = bind(evaluate_model, options)
    threads = cpu_share(sweep.trials_per_device)
    out: dict[str, dict[str, Any]] = {}
    n = sweep.trials_per_device
    for wave in (trials[i:i + n] for i in range(0, len(trials), n)):
        futures = []
        for t in wave:
            cfg = _budgeted(t, budget)
            futures.append((t, trainer.submit(datasets[_data_key(t)], cfg.model, cfg.train, options.store_root(),
                                              options.nproc, options.grace_s, ray=options.ray_cluster(),
                                              threads=threads)))
        for t, future in futures:
            future.wait()
            state = future.state
            stages.setdefault("train_model", []).append(state.name)
            if not state.is_completed():
                out[t.id] = {"exception": _exception(state)}
                continue
            out[t.id] = {"run": future.result()}
    if evaluate:
        for t in trials:
            if "run" not in out[t.id]:
                continue
            evaluated = evaluator(out[t.id]["run"], datasets[_data_key(t)], prefixes=tuple(options.sample_prefixes),
                                  num_tokens=options.sample_tokens, temperature=options.sample_temperature,
                                  return_state=True)
            stages.setdefault("evaluate_model", []).append(evaluated.name)
            if evaluated.is_completed():
                out[t.id]["evaluation"] = evaluated.result()
            else:
                out[t.id] = {"exception": _exception(evaluated)}
    return out


def _exception(state) -> BaseException:
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - the trial's own error, kept to raise if every trial fails
        return e
    return RuntimeError(f"ended {state.name}: {state.message}")


def _dispatch_trials(trials: list[Trial], datasets, budget: int | None, options: PipelineOptions,
                     stages, subflows: list[str]) -> dict[str, dict[str, Any]]:
    """Every trial at once as a flow run of the train deployment: its work pool's workers and
    concurrency limit decide how many train together, and where."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(trials), thread_name_prefix="trial") as pool:
        # each thread runs in a copy of this flow run's context, so its flow run is a subflow of this one
        futures = {t.id: pool.submit(contextvars.copy_context().run, _dispatch_trial, t, datasets[_data_key(t)],
                                     budget, options) for t in trials}
        out = {tid: f.result() for tid, f in futures.items()}
    for o in out.values():
        if o.get("flow_run_id"):
            subflows.append(o["flow_run_id"])
            for name, states in o["stages"].items():
                stages.setdefault(name, []).extend(states)
    return out


def _dispatch_trial(trial: Trial, dataset: dict[str, Any], budget: int | None,
                    options: PipelineOptions) -> dict[str, Any]:
    """One trial as a flow run of the train deployment (training and evaluation on its work pool)."""
    from flows.dispatch import dispatch

    cfg = _budgeted(trial, budget)
    child = options.model_copy(update={"dispatch": "local"}).model_dump(mode="json")
    try:
        trained = dispatch(options.train_deployment, {"dataset": dataset, "model": cfg.model.model_dump(mode="json"),
                                                      "training": cfg.train.model_dump(mode="json"), "options": child},
                           options, stage=f"train {trial.id}")
    except Exception as e:  # noqa: BLE001 - recorded; the sweep fails only if every trial does
        return {"exception": e}
    return {"run": trained["run"], "evaluation": trained["evaluation"], "flow_run_id": trained["flow_run_id"],
            "stages": trained.get("stages", {})}
