"""The task runner a flow maps its stages on: a thread pool, or Dask when asked for."""

from __future__ import annotations

import os

from prefect.task_runners import ThreadPoolTaskRunner

from tasks.options import ENV_DASK, PipelineOptions


def task_runner_for(options: PipelineOptions | None = None):
    """A thread pool, or Dask (prefect-dask) when ``options.dask`` / ``$RNNLM_DASK`` asks for it.

    ``local``: a temporary ``LocalCluster`` of worker processes on this machine;
    ``local-threads``: the same with ``processes=False`` (one process, cheap to start);
    anything else is a scheduler address (``tcp://host:8786``).
    """
    options = options or PipelineOptions()
    target = options.dask_target()
    if not target:
        return ThreadPoolTaskRunner(max_workers=options.max_workers)
    from prefect_dask import DaskTaskRunner

    if target == "local":
        n = max(1, min(4, os.cpu_count() or 1))
        return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    if target == "local-threads":
        return DaskTaskRunner(cluster_kwargs={"n_workers": 1, "threads_per_worker": options.max_workers or 2,
                                              "processes": False, "dashboard_address": None})
    return DaskTaskRunner(address=target)


def default_task_runner():
    """The decorator default: a thread pool unless ``$RNNLM_DASK`` is set when flows are imported."""
    return task_runner_for(PipelineOptions(dask=os.environ.get(ENV_DASK) or None))
