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


def test_gc_on_s3_deletes_past_the_policy_and_keeps_the_champion(tmp_path, s3_server, s3_root, monkeypatch):
    """``rnnlm gc`` on a storage root in S3, MLflow behind a tracking server with its artifacts in the
    bucket: version 1 (its alias moved to version 2) goes with its run, artifacts and dataset; version 2,
    the champion, keeps its run and dataset but its run's checkpoints go."""
    from mlflow import MlflowClient

    from pipeline import storage
    from pipeline.registry.cleanup import registered_versions
    from tests.servers import clean_env
    from tests.test_cli import RNNLM
    from tests.test_registry import start_mlflow_server, stop_server

    bucket = s3_root.rsplit("/", 1)[0]
    env = clean_env(**s3_server.env)
    url, _, proc, log_file = start_mlflow_server(tmp_path, env, artifacts=f"{bucket}/mlflow")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        path = corpus(tmp_path, TEXT)
        first, second = night(path, s3_root, 1), night(path, s3_root, 2)
        assert second["registered"]["version"] == "2"
        client = MlflowClient(url)
        client.set_registered_model_alias(MODEL, "champion", "2")  # whatever the gate decided: v1 holds no alias now
        old = registered_versions(s3_root)[0]
        assert old.version == "1" and not old.aliases and len(old.artifact_uris) == 2
        old_run, old_ds = first["run"]["id"], first["dataset"]["dataset_id"]
        run_key, kept_ds = second["run"]["id"], second["dataset"]["dataset_id"]
        assert old_ds != kept_ds

        fs, base = storage.filesystem(s3_root)
        artifacts = bucket.removeprefix("s3://") + "/mlflow/"

        def keys(under: str = base) -> list[str]:
            fs.invalidate_cache()
            return sorted(k[len(under):].lstrip("/") for k in fs.find(under))

        before = keys()
        assert any(k.startswith(f"runs/{run_key}/checkpoints/") for k in before)
        old_artifacts = [uri.removeprefix("mlflow-artifacts:/").strip("/") for uri in old.artifact_uris]
        assert all(any(k.startswith(a + "/") for k in keys(artifacts)) for a in old_artifacts), old.artifact_uris

        gc_args = [RNNLM, "gc", "--root", s3_root, "--set", "min_age_hours=0", "--set", "keep_versions=1",
                   "--set", "keep_runs=0", "--set", "keep_datasets=0"]
        gc_env = {**env, "MLFLOW_TRACKING_URI": url}
        dry = subprocess.run(gc_args + ["--json"], env=gc_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert dry.returncode == 0, dry.stderr[-3000:]
        planned = {(d["kind"], d["id"]) for d in json.loads(dry.stdout)["deletions"]}
        assert {("version", f"{MODEL}/1"), ("run", old_run), ("dataset", old_ds), ("checkpoints", run_key)} <= planned
        assert not {("version", f"{MODEL}/2"), ("run", run_key), ("dataset", kept_ds)} & planned, planned
        assert keys() == before and len(client.search_model_versions(f"name='{MODEL}'")) == 2  # a dry run deletes nothing

        done = subprocess.run(gc_args + ["--yes"], env=gc_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"deleted checkpoints {run_key}" in done.stdout and f"deleted dataset {old_ds}" in done.stdout, done.stdout
        after = keys()
        assert not any(k.startswith((f"runs/{run_key}/checkpoints/", f"runs/{old_run}/", f"datasets/{old_ds}/"))
                       for k in after)
        assert f"runs/{run_key}/model.pt" in after and f"datasets/{kept_ds}/manifest.json" in after
        assert [v.version for v in client.search_model_versions(f"name='{MODEL}'")] == ["2"]
        assert not any(k.startswith(a + "/") for k in keys(artifacts) for a in old_artifacts)

        # the champion still loads, in a clean process with only the tracking URL
        code = ("import mlflow\n"
                f"m = mlflow.pyfunc.load_model('models:/{MODEL}@champion')\n"
                "print(len(m.predict(['time traveller'], params={'num_tokens': 5})[0]))\n")
        out = subprocess.run([sys.executable, "-c", code], env=clean_env(MLFLOW_TRACKING_URI=url), cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split()[-1] == str(len("time traveller") + 5)
    finally:
        stop_server(proc, log_file)


def test_purging_writes_nothing_to_stdout(store, capsys):
    """``mlflow gc`` echoes each run it purges; ``rnnlm gc --json`` owns stdout, so purge must not print."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.registry.cleanup import purge
    from pipeline.registry.tracking import tracking_uri

    Path(store).mkdir(parents=True)
    client = MlflowClient(tracking_uri(store))
    run = client.create_run(client.create_experiment("gc-stdout"))
    client.delete_run(run.info.run_id)
    capsys.readouterr()
    purge([run.info.run_id], [], set(), store)
    assert capsys.readouterr().out == ""
    with pytest.raises(MlflowException):
        client.get_run(run.info.run_id)  # purged, not only deleted
