"""The main job behind ``rnnlm run``: the ``retrain`` flow on embedded defaults.

* Prefect: with no ``PREFECT_API_URL``, Prefect starts its own local server on SQLite
  for the duration of the run, with ``PREFECT_HOME`` (the database, logs) under the
  artifact store (``<root>/prefect``) unless ``PREFECT_HOME`` is set. With
  ``PREFECT_API_URL`` set, runs are reported to that server instead.
* Artifacts under ``./.rnnlm/`` (or ``root`` / ``$RNNLM_STORAGE``).
* The ``timemachine-char`` preset unless told otherwise.

Running it twice: the second run finishes from cache (every stage ``Cached``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Optional

from pipeline import storage
from pipeline.config import DEFAULT_PRESET


def _prefect_settings(root: str):
    """Point PREFECT_HOME under the store unless the user chose a home or a server."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    if os.environ.get("PREFECT_HOME") or os.environ.get("PREFECT_API_URL") or not storage.is_local(root):
        return contextlib.nullcontext()
    home = os.path.join(storage.local_path(root), "prefect")
    os.makedirs(home, exist_ok=True)  # the SQLite database lives here
    # analytics off: its heartbeat races the first migrations on a fresh SQLite file ("database is locked")
    return temporary_settings(updates={PREFECT_HOME: home, PREFECT_SERVER_ANALYTICS_ENABLED: False})


def run_main(preset: str = DEFAULT_PRESET, root: Optional[str] = None, overrides: Optional[list[str]] = None,
             *, options: Optional[dict[str, Any]] = None, print_summary: bool = True) -> dict[str, Any]:
    """Run ``retrain`` and print a summary; returns the summary dict.

    ``preset``: a preset name or a RunConfig YAML path; ``overrides``: ``section.key=value``
    strings; ``options``: PipelineOptions fields (``dask``, ``nproc``, ``register_model``, ...).
    Raises the pipeline's error (a PipelineError for expected failures) if the flow fails.
    """
    root = storage.storage_root(root)
    with _prefect_settings(root):
        from flows.retrain import retrain_flow
        from tasks.common import PipelineOptions

        opts = PipelineOptions(**{**(options or {}), "root": root})
        started = time.perf_counter()
        result = retrain_flow(preset=preset, overrides=list(overrides or []), options=opts)
        summary = make_summary(result, time.perf_counter() - started)
        summary["prefect_ui"] = prefect_ui_hint(result.get("flow_run_id"))
    if print_summary:
        print_report(summary)
    return summary


def make_summary(result: dict[str, Any], wall_s: float) -> dict[str, Any]:
    ds, run, ev = result["dataset"], result["run"], result["evaluation"]
    stages = result["stages"]
    states = [s for names in stages.values() for s in names]
    return {
        "flow_run_id": result["flow_run_id"],
        "tokens": ds["num_tokens"], "splits": ds["splits"], "vocab_size": ds["vocab_size"], "level": ds["level"],
        "dataset_uri": ds["uri"],
        "epochs": run["epochs"], "finished": run["finished"], "tokens_per_s": run["tokens_per_s"],
        "train_wall_s": run["wall_s"], "val_ppl": ev["val_ppl"], "test_ppl": ev["test_ppl"],
        "val_bits": ev.get("val_bits"), "test_bits": ev.get("test_bits"),
        "run_dir": run["run_dir"], "model_uri": run["model_uri"],
        "samples": [s["text"] for s in ev["samples"]],
        "stages": stages, "cached_stages": sum(s == "Cached" for s in states), "total_stages": len(states),
        "registered": result.get("registered"),
        "wall_s": wall_s,
    }


def prefect_ui_hint(flow_run_id: Optional[str]) -> str:
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_UI_URL

    path = f"/runs/flow-run/{flow_run_id}" if flow_run_id else ""
    if PREFECT_API_URL.value():
        ui = PREFECT_UI_URL.value() or PREFECT_API_URL.value().removesuffix("/api")
        return f"open {ui}{path}"
    return (f"PREFECT_HOME={PREFECT_HOME.value()} prefect server start   "
            f"# then open http://127.0.0.1:4200{path}")


def print_report(s: dict[str, Any], file=sys.stdout) -> None:
    def f(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)

    p = lambda *a: print(*a, file=file)  # noqa: E731
    p("")
    p("=" * 72)
    p("rnnlm run: done" + (f" ({s['cached_stages']}/{s['total_stages']} stages from cache)" if s["cached_stages"] else ""))
    p(f"  tokens            {s['tokens']:,} ({s['level']}; train {s['splits']['train']:,}, val {s['splits']['val']:,}, test {s['splits']['test']:,})")
    p(f"  vocabulary        {s['vocab_size']:,}")
    p(f"  epochs            {s['epochs']}{'' if s['finished'] else ' (stopped at max_minutes)'}")
    p(f"  training          {f(s['tokens_per_s'], ',.0f')} tokens/s, {f(s['train_wall_s'], '.1f')} s")
    p(f"  perplexity        validation {f(s['val_ppl'])}, test {f(s['test_ppl'])}")
    p(f"  bits per {s['level'] if s['level'] == 'word' else 'char'}     validation {f(s['val_bits'])}, test {f(s['test_bits'])}")
    p(f"  model             {s['model_uri']}")
    for i, text in enumerate(s["samples"], 1):
        p(f"  sample {i}          {text!r}")
    p(f"  wall time         {s['wall_s']:.1f} s")
    p(f"  Prefect UI        {s['prefect_ui']}")
    reg = s.get("registered")
    if reg and reg.get("registered"):
        gate = reg["gate"]
        p(f"  registered        {reg['name']} version {reg['version']} "
          f"({'champion' if gate['promoted'] else 'challenger; champion stays version ' + str(gate['champion_version'])})")
        p(f"  gate              {gate['reason']}")
        p(f"  MLflow UI         mlflow ui --backend-store-uri {reg['tracking_uri']} --host 127.0.0.1 --port 5000"
          if reg["tracking_uri"].startswith("sqlite") else f"  MLflow UI         open {reg['tracking_uri']}")
        p(f"  consume           mlflow.pyfunc.load_model('models:/{reg['name']}@champion')")
    p("=" * 72)


if __name__ == "__main__":
    run_main(*sys.argv[1:2])
