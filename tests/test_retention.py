"""Acceptance (issue 25): retention keeps a nightly's store bounded, beside running work, failing closed.

Six nightly retrains on a growing corpus with the vocabulary pinned to the champion's and the
default policy (ages set to 0 so a test's minutes count as a night), gc after each: the root
stops growing, the champion and every kept version load in a clean process, versions past the
policy are gone with their artifacts. Then gc while a retrain trains, and while one sits between
its data and training stages: both finish and register. The real retrain flow on a temporary
Prefect server (tests/test_flows.py's), MLflow on SQLite under the test's store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_flows import TEXT, corpus, prefect_server, retrain, run_config  # noqa: F401 (module fixture)

pytestmark = pytest.mark.slow

MODEL = "rnnlm-custom"
NIGHT = ("Filby became pensive. 'Clearly,' the Time Traveller proceeded, 'any real body must have extension "
         "in four directions: it must have Length, Breadth, Thickness, and Duration.'\n")


def now_policy(**kw):
    """The default policy, but a test's seconds are old enough to go."""
    from pipeline.config import RetentionConfig

    return RetentionConfig(min_age_hours=0, staging_max_age_hours=0, **kw)


def gc(store, policy, apply=True):
    from pipeline.store.inventory import take_inventory
    from pipeline.store.retention import apply_plan, plan_retention

    plan = plan_retention(take_inventory(store), policy)
    done = apply_plan(plan) if apply else []
    return plan, done


def du(path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def du_by_entry(path) -> dict[str, int]:
    return {p.name: du(p) if p.is_dir() else p.stat().st_size for p in Path(path).iterdir()}


def night(path, store, n, **kw):
    path.write_text(TEXT + NIGHT * n, encoding="utf-8")
    return retrain(run_config(path, epochs=1), store, register_model=True, pin_vocab="champion", **kw)


def load_in_clean_process(store, uris):
    code = ("import sys, mlflow\n"
            "for uri in sys.argv[1:]:\n"
            "    m = mlflow.pyfunc.load_model(uri)\n"
            "    print(uri, len(m.predict(['time traveller'], params={'num_tokens': 5})[0]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    from pipeline.registry.tracking import tracking_uri

    env["MLFLOW_TRACKING_URI"] = tracking_uri(store)
    proc = subprocess.run([sys.executable, "-c", code, *uris], cwd="/", env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def test_six_nights_with_gc_stay_bounded_and_keep_what_serves(tmp_path, store):
    from mlflow import MlflowClient

    from pipeline.registry.tracking import tracking_uri

    client = MlflowClient(tracking_uri(store))
    path, sizes, purged, parts = corpus(tmp_path, TEXT), {}, [], {}
    policy = now_policy()
    for n in range(1, 7):
        result = night(path, store, n)
        assert result["registered"]["new_version"]
        plan, done = gc(store, policy)
        purged += plan.doomed_versions
        sizes[n], parts[n] = du(store), du_by_entry(store)
        kinds = {d.kind for d in done}
        assert n < 2 or "checkpoints" in kinds  # a finished, registered run drops its checkpoints
        versions = client.search_model_versions(f"name='{MODEL}'")
        assert len(versions) <= policy.keep_versions
    assert sizes[6] <= 1.1 * sizes[3], (sizes, parts[3], parts[6])

    # past the policy: gone from the registry, their runs' and models' artifacts gone from storage
    assert len(purged) >= 3
    kept = {v.version for v in client.search_model_versions(f"name='{MODEL}'")}
    for v in purged:
        assert v.version not in kept
        for uri in v.artifact_uris:
            assert not Path(uri.removeprefix("file://")).exists(), uri
        assert not Path(v.run_dir).exists()
    for run in Path(store, "runs").iterdir():
        assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())

    # the champion and every kept version load in a clean process
    uris = [f"models:/{MODEL}@champion", *(f"models:/{MODEL}/{v}" for v in sorted(kept))]
    lines = load_in_clean_process(store, uris)
    assert [line.split()[0] for line in lines] == uris


def _run_in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 (re-raised in the test thread)
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def _finish(t, box):
    t.join(timeout=900)
    assert not t.is_alive(), "retrain did not finish"
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_gc_while_a_retrain_trains_keeps_its_run_and_dataset(tmp_path, store):
    path = corpus(tmp_path, TEXT)
    night(path, store, 1)  # something for gc to do: the first night's checkpoints
    path.write_text(TEXT + NIGHT * 5, encoding="utf-8")  # night 2: a long training, gc runs meanwhile
    t, box = _run_in_thread(lambda: retrain(run_config(path, epochs=30), store, register_model=True))
    deadline = time.monotonic() + 600
    from pipeline.store.inventory import run_dir_locked

    training = None
    while training is None and time.monotonic() < deadline and t.is_alive():
        for run in Path(store, "runs").iterdir():
            if run_dir_locked(str(run)) and (run / "checkpoints").exists():
                training = run
        time.sleep(0.2)
    assert training is not None, box
    plan, done = gc(store, now_policy(keep_runs=0, keep_datasets=0))
    assert done and plan.kept[f"run:{training.name}"] in ("leased by a running flow", "a live launch holds its lock")
    assert training.exists()
    result = _finish(t, box)
    assert result["registered"]["new_version"] and result["run"]["run_dir"] == str(training)
    assert Path(result["dataset"]["uri"]).exists()


def test_gc_between_data_and_training_keeps_the_fresh_dataset(tmp_path, store, monkeypatch):
    import flows.retrain

    path = corpus(tmp_path, TEXT)
    night(path, store, 1)
    between, go_on = threading.Event(), threading.Event()
    real_train_flow = flows.retrain.train_flow

    def paused_train_flow(**kw):
        between.set()
        assert go_on.wait(600)
        return real_train_flow(**kw)

    monkeypatch.setattr(flows.retrain, "train_flow", paused_train_flow)
    path.write_text(TEXT + NIGHT * 3, encoding="utf-8")
    t, box = _run_in_thread(lambda: retrain(run_config(path, epochs=1), store, register_model=True))
    assert between.wait(600), box
    datasets = {p.name for p in Path(store, "datasets").iterdir()}
    assert len(datasets) == 2
    plan, done = gc(store, now_policy(keep_runs=0, keep_datasets=0))
    assert done  # gc did delete (night 1's checkpoints, its work files) ...
    assert {p.name for p in Path(store, "datasets").iterdir()} == datasets  # ... but no dataset
    go_on.set()
    result = _finish(t, box)
    assert result["registered"]["new_version"] and result["dataset"]["dataset_id"] in datasets


def test_gc_that_cannot_read_the_registry_deletes_nothing(tmp_path, store):
    path = corpus(tmp_path, TEXT)
    night(path, store, 1)
    Path(store, "datasets", "abc.tmp-0123456789ab").mkdir()  # something gc would sweep
    Path(store, "datasets", "abc.tmp-0123456789ab", "part").write_text("x")
    before = sorted(str(p) for p in Path(store).rglob("*") if "mlflow.db" not in p.name)
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "RNNLM_STORAGE": store}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "gc", "--yes", "--set", "min_age_hours=0",
                           "--set", "staging_max_age_hours=0"], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1].startswith("rnnlm: error:") and "registry" in proc.stderr
    assert sorted(str(p) for p in Path(store).rglob("*") if "mlflow.db" not in p.name) == before
    # with the registry back, the same gc deletes the staging dir
    env.pop("MLFLOW_TRACKING_URI")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "gc", "--yes", "--json", "--set", "min_age_hours=0",
                           "--set", "staging_max_age_hours=0"], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    deleted = json.loads(proc.stdout)["deleted"]
    assert {"kind": "staging", "id": "abc.tmp-0123456789ab"}.items() <= {**deleted[0]}.items() or \
        any(d["kind"] == "staging" for d in deleted)
    assert not Path(store, "datasets", "abc.tmp-0123456789ab").exists()
