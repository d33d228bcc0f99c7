"""The main job behind ``rnnlm run``: the ``retrain`` flow on embedded defaults.

* Prefect: with no ``PREFECT_API_URL``, Prefect starts its own local server on SQLite
  for the duration of the run, with ``PREFECT_HOME`` (the database, logs) under the
  artifact store (``<root>/prefect``) unless ``PREFECT_HOME`` is set. With
  ``PREFECT_API_URL`` set, runs are reported to that server instead.
* Artifacts under ``./.rnnlm/`` (or ``root`` / ``$RNNLM_STORAGE``).
* The ``timemachine-char`` preset unless told otherwise.
* Telemetry off (``flows.servers.TELEMETRY_OFF``): in this process, so in the embedded
  server and the trainers it starts too.

Running it twice: the second run finishes from cache (every stage ``Cached``).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

from flows.reports import make_summary, prefect_ui_hint, print_report
from flows.servers import TELEMETRY_OFF
from pipeline import storage
from pipeline.config_sources import DEFAULT_PRESET


def _prefect_settings(root: str):
    """Server analytics off, time for a first start; PREFECT_HOME under the store unless the user chose a home or a server."""
    from prefect.settings import (PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED,
                                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings)

    updates = {PREFECT_SERVER_ANALYTICS_ENABLED: False}
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in os.environ:
        # a fresh SQLite database runs every migration first: more than Prefect's 20 s on a busy machine
        updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = 120
    if not (os.environ.get("PREFECT_HOME") or os.environ.get("PREFECT_API_URL") or not storage.is_local(root)):
        home = os.path.join(storage.local_path(root), "prefect")
        os.makedirs(home, exist_ok=True)  # the SQLite database lives here
        updates[PREFECT_HOME] = home
    return temporary_settings(updates=updates)


def run_main(preset: str = DEFAULT_PRESET, root: Optional[str] = None, overrides: Optional[list[str]] = None,
             *, options: Optional[dict[str, Any]] = None, print_summary: bool = True,
             sweep: Optional[str] = None) -> dict[str, Any]:
    """Run ``retrain`` and print a summary; returns the summary dict.

    ``preset``: a preset name or a RunConfig YAML path; ``overrides``: ``section.key=value``
    strings; ``options``: PipelineOptions fields (``dask``, ``nproc``, ``register_model``, ...);
    ``sweep``: a sweep file (``pipeline.sweep``), read and checked before Prefect starts.
    Raises the pipeline's error (a PipelineError for expected failures) if the flow fails.
    """
    os.environ.update(TELEMETRY_OFF)  # before Prefect starts its server or sends an event
    root = storage.storage_root(root)
    if sweep is not None:  # a bad sweep file or trial fails here, before any server starts
        from pipeline.config_sources import load_run_config
        from pipeline.sweep import expand, load_sweep

        sweep_config = load_sweep(sweep)
        expand(sweep_config, load_run_config(preset, overrides))
    with _prefect_settings(root):
        from flows.retrain import retrain_flow
        from tasks.options import PipelineOptions

        opts = PipelineOptions(**{**(options or {}), "root": root})
        started = time.perf_counter()
        result = retrain_flow(preset=preset, overrides=list(overrides or []), options=opts,
                              sweep=sweep_config if sweep is not None else None)
        summary = make_summary(result, time.perf_counter() - started)
        summary["prefect_ui"] = prefect_ui_hint(result.get("flow_run_id"))
    if print_summary:
        print_report(summary)
    return summary


if __name__ == "__main__":
    run_main(*sys.argv[1:2])
