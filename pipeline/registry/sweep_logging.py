"""Logging a sweep in MLflow: one parent run, one nested run per trial with its values, status and curve.

    parent = log_sweep("timemachine-char", sweep_key, trials, root=root, flow_run_id=...)

Each trial is a dict: ``id``, ``overrides`` (the values it sets), ``status`` (``best``, ``finished``,
``stopped`` by successive halving, ``failed``), ``run_dir`` (or None), ``val_ppl``, ``test_ppl``,
``error``. Idempotent like ``log_training_run``: a FINISHED parent tagged with the same
``rnnlm.sweep_key`` is returned instead of logging the sweep again.
"""

from __future__ import annotations

import math
import time
from typing import Any

from pipeline import storage
from pipeline.registry.tracking import client, experiment_name, get_or_create_experiment, registry_access
from pipeline.training.metrics import read_epochs

CURVE_METRICS = ("train_ppl", "val_ppl")


@registry_access("logging a sweep in MLflow")
def log_sweep(preset: str, sweep_key: str, trials: list[dict[str, Any]], *, root: str | None = None,
              flow_run_id: str | None = None) -> str:
    """The parent run's id, its trials logged under it (once)."""
    from mlflow.entities import Metric, Param

    c = client(root)
    experiment_id = get_or_create_experiment(c, experiment_name(preset), root)
    done = c.search_runs([experiment_id], f"tags.`rnnlm.sweep_key` = '{sweep_key}' and attributes.status = 'FINISHED'",
                         max_results=1)
    if done:
        return done[0].info.run_id
    now = int(time.time() * 1000)
    parent = c.create_run(experiment_id, run_name=f"{preset}-sweep-{sweep_key[:8]}",
                          tags={"rnnlm.sweep_key": sweep_key, "rnnlm.preset": preset,
                                "prefect.flow_run_id": flow_run_id or "", "rnnlm.sweep.trials": str(len(trials))})
    parent_id = parent.info.run_id
    try:
        for t in trials:
            run = c.create_run(experiment_id, run_name=t["id"], tags={
                "mlflow.parentRunId": parent_id, "rnnlm.trial": t["id"], "rnnlm.trial.status": t["status"],
                "rnnlm.run_dir": str(t.get("run_dir") or ""), "rnnlm.trial.error": (t.get("error") or "")[:4000]})
            metrics = [Metric(f"final_{k}", float(t[k]), now, 0) for k in ("val_ppl", "test_ppl") if _finite(t.get(k))]
            if t.get("run_dir") and storage.exists(t["run_dir"]):
                metrics += [Metric(k, float(e[k]), now, int(e["step"] if e.get("event") == "eval" else e["epoch"]))
                            for e in read_epochs(t["run_dir"]) for k in CURVE_METRICS if _finite(e.get(k))]
            c.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in t["overrides"].items()],
                        metrics=metrics[:1000])
            c.set_terminated(run.info.run_id, "FAILED" if t["status"] == "failed" else "FINISHED")
    except BaseException:
        c.set_terminated(parent_id, "FAILED")
        raise
    c.set_terminated(parent_id, "FINISHED")
    return parent_id


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
