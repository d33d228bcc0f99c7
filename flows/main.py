"""The main job behind ``rnnlm run``: the ``retrain`` flow on embedded defaults.

* Prefect: with no ``PREFECT_API_URL``, a temporary local Prefect server on SQLite
  (``flows.servers.EmbeddedServer``: the process Prefect's ephemeral mode runs, started
  first, beside this process's imports) for the duration of the run, with ``PREFECT_HOME``
  (the database, logs) under the artifact store (``<root>/prefect``) unless ``PREFECT_HOME``
  is set; a new home starts from a migrated template database. With ``PREFECT_API_URL`` set
  (in the environment or a Prefect profile), runs are reported to that server instead.
* Artifacts under ``./.rnnlm/`` (or ``root`` / ``$RNNLM_STORAGE``).
* The ``timemachine-char`` preset unless told otherwise.
* Telemetry off (``flows.servers.TELEMETRY_OFF``): in this process, so in the embedded
  server and the trainers it starts too.

Running it twice: the second run finishes from cache (every stage ``Cached``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Optional

from flows.reports import make_summary, prefect_ui_hint, print_report
from flows import servers
from flows.servers import TELEMETRY_OFF, EmbeddedServer
from pipeline import storage
from pipeline.config_sources import DEFAULT_PRESET


def _import_stage_modules(registering: bool) -> None:
    """Import what the stages import anyway (torch with the trainer's and the model's modules;
    MLflow when registering) now, while the server is still starting on the other core, instead
    of inside the stages, after it."""
    import pipeline.model.lm  # noqa: F401
    import pipeline.training.checkpoint  # noqa: F401
    import pipeline.training.launch  # noqa: F401

    if registering:
        import mlflow  # noqa: F401


def _api(server: Optional[EmbeddedServer]):
    """``PREFECT_API_URL`` set to the embedded server once it answers (nothing to do without one)."""
    if server is None:
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():  # a server named in a Prefect profile, not the environment: runs report there
        server.stop()
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_API_URL: server.wait_ready()})


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


# What a run writes besides its artifacts: the embedded Prefect server's SQLite database (about
# 5 MB after one run), MLflow's, the run log. Below this, the server cannot even migrate its
# database, and Prefect reports only a start-up timeout, minutes later.
MIN_FREE_BYTES = 32 * 2**20


def check_free_space(root: str) -> None:
    """Fail at once, naming the place, when a local root (or the embedded server's PREFECT_HOME)
    has no room for the run's databases and log."""
    from pipeline.errors import StorageError

    places = {"the storage root": storage.local_path(root)} if storage.is_local(root) else {}
    if not os.environ.get("PREFECT_API_URL"):  # the embedded server: its database in PREFECT_HOME
        home = os.environ.get("PREFECT_HOME") or (places and os.path.join(places["the storage root"], "prefect"))
        if home:
            places["PREFECT_HOME (the embedded Prefect server's database)"] = os.path.expanduser(home)
    for what, path in places.items():
        free = storage.free_bytes(path)
        if free is not None and free < MIN_FREE_BYTES:
            raise StorageError(path, f"no space left on device: {free / 2**20:.1f} MB free where {what} needs at "
                                     f"least {MIN_FREE_BYTES // 2**20} MB for the run's databases and log; free "
                                     f"space there and run again")


def prefect_home(root: str) -> str:
    """Where the embedded server keeps its database: ``$PREFECT_HOME``, else ``<root>/prefect``
    for a local root, else Prefect's default."""
    if os.environ.get("PREFECT_HOME"):
        return os.path.expanduser(os.environ["PREFECT_HOME"])
    if storage.is_local(root):
        return os.path.join(storage.local_path(root), "prefect")
    return os.path.expanduser("~/.prefect")


def embedded_server(root: str) -> Optional[EmbeddedServer]:
    """This process's temporary server (started now if need be), or None when ``PREFECT_API_URL``
    names a server."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 120)
    return servers.embedded_server(prefect_home(root), startup_timeout_s=timeout)


def run_main(preset: str = DEFAULT_PRESET, root: Optional[str] = None, overrides: Optional[list[str]] = None,
             *, options: Optional[dict[str, Any]] = None, print_summary: bool = True,
             server: Optional[EmbeddedServer] = None, sweep: Optional[str] = None) -> dict[str, Any]:
    """Run ``retrain`` and print a summary; returns the summary dict.

    ``preset``: a preset name or a RunConfig YAML path; ``overrides``: ``section.key=value``
    strings; ``options``: PipelineOptions fields (``dask``, ``nproc``, ``register_model``, ...);
    ``server``: an :func:`embedded_server` the caller started (else one is started here, unless
    ``PREFECT_API_URL`` names a server). ``sweep``: a sweep file (``pipeline.sweep``), read and
    checked before anything trains. Raises the pipeline's error (a PipelineError for expected
    failures) if the flow fails.
    """
    os.environ.update(TELEMETRY_OFF)  # before Prefect starts its server or sends an event
    root = storage.storage_root(root)
    if sweep is not None:  # a bad sweep file or trial fails here, before any stage runs
        from pipeline.config_sources import load_run_config
        from pipeline.sweep import expand, load_sweep

        sweep_config = load_sweep(sweep)
        expand(sweep_config, load_run_config(preset, overrides))
    # The server first: it starts on another core while this process imports Prefect and the pipeline.
    server = server or embedded_server(root)
    with _prefect_settings(root):
        from flows.retrain import retrain_flow
        from tasks.options import PipelineOptions

        opts = PipelineOptions(**{**(options or {}), "root": root})
        started = time.perf_counter()
        if server is not None:
            _import_stage_modules(opts.register_model)
        with _api(server):
            result = retrain_flow(preset=preset, overrides=list(overrides or []), options=opts,
                                  sweep=sweep_config if sweep is not None else None)
        summary = make_summary(result, time.perf_counter() - started)
        summary["prefect_ui"] = prefect_ui_hint(result.get("flow_run_id"))  # the embedded server is gone after
    if print_summary:
        print_report(summary)
    return summary


if __name__ == "__main__":
    run_main(*sys.argv[1:2])
