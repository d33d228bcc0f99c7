"""Deployments: deployments/prefect.yaml, the server operations (flows/servers.py), and the distributed retrain end to end.

The end-to-end test uses real components on loopback only: ``prefect server start`` (SQLite,
temp ``PREFECT_HOME``) on a free 127.0.0.1 port, ``rnnlm deploy`` run from elsewhere than the
repository root, one ``rnnlm worker`` per pool (control, cpu, gpu) polling every second, a
shared storage root and a SQLite MLflow database in a temp dir, and ``prefect deployment run
retrain/nightly`` with a tiny configuration. Every process is started in its own process
group and stopped by PID (group, then any stray descendant) in a finalizer, pass or fail.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

from tests.servers import Processes, clean_env, free_port, wait_http, wait_until

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"

TINY = ["data.splits.max_tokens=4000", "model.hidden_size=16", "model.embed_size=8", "train.epochs=1",
        "train.batch_size=8", "train.num_steps=16"]


# ------------------------------------------------------------------------- quick checks


def deployments_by_name() -> dict[str, dict]:
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    return {d["name"]: d for d in spec["deployments"]}, spec


def test_prefect_yaml_deployments_pools_schedule_and_pull_step():
    import importlib

    from tasks.options import PipelineOptions

    deps, spec = deployments_by_name()
    assert set(deps) == {"nightly", "nightly-sweep", "cpu", "gpu", "daily"}
    expected = {"nightly": ("retrain", "control"), "nightly-sweep": ("retrain", "control"),
                "cpu": ("prepare-data", "cpu"), "gpu": ("train", "gpu"), "daily": ("gc", "cpu")}
    for name, (flow_name, pool) in expected.items():
        module, fn = deps[name]["entrypoint"].split(":")
        assert (REPO / module).is_file()
        flow = getattr(importlib.import_module(module[:-3].replace("/", ".")), fn)
        assert flow.name == flow_name  # so the deployment is <flow_name>/<name>
        assert deps[name]["work_pool"]["name"] == pool
    # the working directory comes from the worker's environment, resolved when a run starts
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $RNNLM_REPO_DIR }}"}}]
    assert deps["nightly"]["schedules"] == [{"cron": "0 3 * * *", "timezone": "UTC", "active": True}]
    opts = PipelineOptions.model_validate(deps["nightly"]["parameters"]["options"])
    assert opts.dispatch == "deployments" and opts.root is None  # each host resolves $RNNLM_STORAGE itself
    assert (opts.prepare_deployment, opts.train_deployment) == ("prepare-data/cpu", "train/gpu")
    # the sweep nightly: its grid file exists and expands on its preset; its schedule is off
    from pipeline.config_sources import load_run_config
    from pipeline.sweep import expand, load_sweep

    sweep = deps["nightly-sweep"]["parameters"]
    assert len(expand(load_sweep(str(REPO / sweep["sweep"])), load_run_config(sweep["preset"]))) == 4
    assert PipelineOptions.model_validate(sweep["options"]).dispatch == "deployments"
    assert deps["nightly-sweep"]["schedules"][0]["active"] is False
    # retention runs after the nightly (03:00 + 6 h of stage timeouts), deleting, on the cpu pool
    assert deps["daily"]["schedules"] == [{"cron": "0 10 * * *", "timezone": "UTC", "active": True}]
    from pipeline.config import RetentionConfig

    assert deps["daily"]["parameters"]["apply"] is True
    RetentionConfig.model_validate(deps["daily"]["parameters"]["policy"])


def test_worker_env_persists_results_on_the_shared_root(tmp_path):
    from flows import servers

    env = servers.worker_env(root=str(tmp_path / "store"), repo_dir="/srv/rnnlm", url="http://127.0.0.1:1/api", base={})
    assert env["RNNLM_STORAGE"] == str(tmp_path / "store") and env["RNNLM_REPO_DIR"] == "/srv/rnnlm"
    assert env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true"
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == str(tmp_path / "store" / "prefect-results" / "flow-runs")
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:1/api"
    remote = servers.worker_env(root="s3://bucket/rnnlm", results_block="remote-file-system/x", base={})
    assert remote["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == "remote-file-system/x"
    assert "PREFECT_RESULTS_LOCAL_STORAGE_PATH" not in remote
    assert servers.worker_command("gpu", limit=1)[-6:] == ["--pool", "gpu", "--type", "process", "--limit", "1"]
    assert servers.pull_step_env_vars() == {"RNNLM_REPO_DIR"}  # kept out of `prefect deploy`'s environment
    assert servers.deploy_command()[-3:] == ["--prefect-file", str(PREFECT_FILE), "--all"]
    server = servers.server_env(root=str(tmp_path / "store"), database_url="postgresql+asyncpg://u:p@db/prefect", base={})
    assert server["PREFECT_HOME"] == str(tmp_path / "store" / "prefect")
    assert server["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")


def test_servers_and_workers_are_started_with_telemetry_off(tmp_path):
    from flows import servers

    off = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
    user = {"DO_NOT_TRACK": "false", "MLFLOW_DISABLE_TELEMETRY": "false"}  # even a user's opt-in stays off
    for env in (servers.server_env(home=str(tmp_path / "home"), base=user),
                servers.worker_env(root=str(tmp_path / "store"), base=user)):
        assert {k: env.get(k) for k in off} == off


def test_dispatch_option_is_validated():
    from pydantic import ValidationError

    from tasks.options import PipelineOptions

    assert PipelineOptions().dispatch == "local"
    with pytest.raises(ValidationError):
        PipelineOptions(dispatch="remote")


# --------------------------------------------------------------------------- the stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    """Server (SQLite) + deployments + one worker per pool sharing a local root and a SQLite
    MLflow database; yields a dict of what the test needs."""
    from pipeline.registry.tracking import ensure_tracking_db

    base = tmp_path_factory.mktemp("deployments")
    tracking = "sqlite:///" + str(base / "mlflow.db")
    ensure_tracking_db(tracking)  # created once, before workers use it concurrently
    procs = Processes(base / "logs")
    request.addfinalizer(procs.stop_all)
    yield start_stack(base, procs, store=str(base / "store"), tracking=tracking)


def start_stack(base: Path, procs: Processes, *, store: str, tracking: str, database_url: str | None = None,
                env: dict | None = None, worker_homes: bool = False) -> dict:
    """A Prefect server (SQLite, or the PostgreSQL of ``database_url``), the deployments, one worker
    per pool on storage root ``store`` and MLflow ``tracking``. ``env`` goes to every process;
    ``worker_homes``: each worker gets its own PREFECT_HOME and working directory (separate hosts)."""
    from flows import servers

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    env = dict(env or {})
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_env = servers.server_env(home=str(base / "server-home"), database_url=database_url, base=clean_env(
        **env, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="10", PREFECT_LOGGING_LEVEL="WARNING"))
    server = procs.start("server", servers.server_command("127.0.0.1", port), server_env)
    wait_http(f"{api}/health", server, procs, "server")
    timings["server_ready_s"] = time.perf_counter() - t0
    client_home = str(base / "client-home")

    # deploy from somewhere else than the repo root, with a deployer-side RNNLM_REPO_DIR that
    # must NOT end up in the deployments (the workers' value is used at run time)
    t = time.perf_counter()
    deployed = subprocess.run([str(BIN / "rnnlm"), "deploy", "--api-url", api], cwd=base, capture_output=True,
                              text=True, timeout=180, env=clean_env(**env, PREFECT_HOME=client_home,
                                                                    RNNLM_REPO_DIR="/nonexistent/deployer/checkout"))
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    timings["deploy_s"] = time.perf_counter() - t

    workers = {}
    for pool in servers.POOLS:
        home = base / f"host-{pool}" if worker_homes else base
        home.mkdir(exist_ok=True)
        worker_env = clean_env(**env, PREFECT_HOME=str(home / "prefect") if worker_homes else client_home,
                               PREFECT_WORKER_QUERY_SECONDS="1", RNNLM_STORAGE=store, MLFLOW_TRACKING_URI=tracking,
                               RNNLM_REPO_DIR=str(REPO), RNNLM_NUM_THREADS="1")
        workers[pool] = procs.start(f"worker-{pool}", [str(BIN / "rnnlm"), "worker", "--pool", pool,
                                                        "--name", f"test-{pool}", "--api-url", api], worker_env,
                                    cwd=home)
    return {"api": api, "store": store, "tracking": tracking, "procs": procs, "workers": workers,
            "client_env": clean_env(**env, PREFECT_HOME=client_home, PREFECT_API_URL=api), "timings": timings,
            "deploy_output": deployed.stdout}


def prefect_client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Client:
        def __enter__(self):
            self._settings = temporary_settings(updates={PREFECT_API_URL: api})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            from prefect.events.worker import EventsWorker

            self._client.__exit__(*exc)
            # Events this process emitted meanwhile (e.g. loading the S3 results block) went to a
            # worker bound to this API; drain and stop it while the server is up, or it outlives the
            # server and later tests' events go to a dead address (their task runs never show).
            EventsWorker.drain_all(timeout=30)
            self._settings.__exit__(*exc)

    return _Client()


@pytest.mark.slow
def test_nightly_retrain_dispatches_stages_to_their_pools_and_registers(stack):
    check_nightly_retrain(stack)


def check_nightly_retrain(stack: dict) -> None:
    """Run retrain/nightly on ``stack`` and check placement, lineage, results on the shared root."""
    from importlib.metadata import version

    from pipeline import storage

    from mlflow.tracking import MlflowClient
    from packaging.version import Version
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    assert Version(version("sqlalchemy")) < Version("2.1"), "sqlalchemy 2.1 breaks prefect 3.8's scheduler"
    procs, api, timings = stack["procs"], stack["api"], stack["timings"]
    params = {"preset": "timemachine-char", "overrides": TINY,
              "options": {"dispatch": "deployments", "dispatch_poll_s": 1, "dispatch_timeout_s": 240,
                          "sample_tokens": 10, "fetch_retry_delay_s": 0.05, "train_retry_delay_s": 0, "grace_s": 5}}
    t = time.perf_counter()
    started = subprocess.run([str(BIN / "prefect"), "deployment", "run", "retrain/nightly", "--params", json.dumps(params)],
                             cwd=REPO, env=stack["client_env"], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", started.stdout)
    assert match, started.stdout
    parent_id = match.group(1)

    deadline = time.monotonic() + 240
    with prefect_client(api) as client:
        while True:
            parent = client.read_flow_run(parent_id)
            if parent.state and parent.state.is_final():
                break
            for name, w in stack["workers"].items():
                assert w.poll() is None, f"worker {name} died:\n{procs.log('worker-' + name)}"
            if time.monotonic() > deadline:
                raise AssertionError(f"retrain still {parent.state_name} after 240 s\n{procs.all_logs()}")
            time.sleep(1)
        timings["nightly_run_s"] = time.perf_counter() - t
        assert parent.state.is_completed(), f"{parent.state_name}: {parent.state.message}\n{procs.all_logs()}"
        assert parent.work_pool_name == "control"

        deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        assert set(deployments) == {"retrain/nightly", "retrain/nightly-sweep", "prepare-data/cpu", "train/gpu",
                                    "gc/daily"}
        # pull steps stored as written: resolved on the worker, not from the deploying shell
        for d in deployments.values():
            assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                     {"directory": "{{ $RNNLM_REPO_DIR }}"}}], d.pull_steps

        children = {}
        for name, pool in (("prepare-data/cpu", "cpu"), ("train/gpu", "gpu")):
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployments[name].id])))
            assert len(runs) == 1, [(r.name, r.state_name) for r in runs]
            child = runs[0]
            assert child.state.is_completed() and child.work_pool_name == pool, (name, child.state_name, child.work_pool_name)
            # linked to the parent as a subflow (run_deployment(as_subflow=True))
            assert str(client.read_task_run(child.parent_task_run_id).flow_run_id) == parent_id
            children[name] = child
        result = parent.state.result()  # persisted on the shared root by the control worker
        dataset_result = children["prepare-data/cpu"].state.result()

        # the cron schedule has put upcoming runs on the calendar (the scheduler service is on)
        scheduled = []
        nightly = deployments["retrain/nightly"]
        while True:
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
            if scheduled or time.monotonic() > deadline + 60:
                break
            time.sleep(1)
    assert scheduled, "no scheduled runs of retrain/nightly"
    for run in scheduled:
        when = run.expected_start_time
        assert (when.hour, when.minute) == (3, 0) and when.utcoffset().total_seconds() == 0, when
        assert when.timestamp() > time.time()

    assert result["dispatch"] == "deployments"
    assert result["placement"] == {"prepare-data": {"deployment": "prepare-data/cpu", "work_pool_name": "cpu"},
                                   "train": {"deployment": "train/gpu", "work_pool_name": "gpu"}}
    assert result["subflow_run_ids"] == [str(children["prepare-data/cpu"].id), str(children["train/gpu"].id)]
    ds = result["dataset"]
    assert ds["dataset_id"] == dataset_result["dataset_id"] and ds["num_tokens"] == 4000
    assert ds["uri"].startswith(stack["store"] + "/") and storage.exists(storage.join(ds["uri"], "manifest.json"))
    assert result["run"]["model_uri"].startswith(stack["store"] + "/") and result["run"]["epochs"] == 1

    # MLflow: a new version with lineage pointing at this very flow run
    reg = result["registered"]
    assert reg["registered"] and reg["name"] == "rnnlm-timemachine-char" and reg["tracking_uri"] == stack["tracking"]
    mlflow = MlflowClient(stack["tracking"], registry_uri=stack["tracking"])
    versions = mlflow.search_model_versions("name='rnnlm-timemachine-char'")
    assert [str(v.version) for v in versions] == [str(reg["version"])]
    tags = mlflow.get_run(versions[0].run_id).data.tags
    assert tags["prefect.flow_run_id"] == parent_id
    assert tags["data.dataset_id"] == ds["dataset_id"]
    assert parent_id in tags["prefect.flow_run_url"]
    print(f"\ntimings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")


@pytest.mark.slow
def test_the_server_and_every_worker_run_with_telemetry_off(stack):
    import psutil

    off = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for name, proc, _ in stack["procs"].procs:  # `rnnlm worker` execs the worker: same pid, its environment
        if name.startswith("worker-"):  # run first (-k), the exec may not have happened yet
            wait_until(lambda pid=proc.pid: "start" in psutil.Process(pid).cmdline(), proc, stack["procs"], name,
                       timeout=60)
        env = psutil.Process(proc.pid).environ()
        assert {k: env.get(k) for k in off} == off, name
    with prefect_client(stack["api"]) as client:
        settings = client.request("GET", "/admin/settings").json()
    assert settings["server"]["analytics_enabled"] is False
    assert "Failed to send telemetry" not in stack["procs"].log("server", tail=10**6)


@pytest.mark.slow
@pytest.mark.parametrize("target, control_limit, expected", [
    ("prepare-data/missing", None, "deployment prepare-data/missing not found"),
    # a child on the parent's own pool, whose limit of 1 the parent holds: refused, not a deadlock
    ("retrain/nightly", 1, "concurrency limit is 1"),
])
def test_bad_dispatch_targets_fail_at_once_and_clearly(stack, target, control_limit, expected):
    from prefect.client.schemas.actions import WorkPoolUpdate

    procs, api = stack["procs"], stack["api"]
    params = {"preset": "timemachine-char", "overrides": TINY,
              "options": {"dispatch": "deployments", "prepare_deployment": target, "dispatch_poll_s": 1}}
    with prefect_client(api) as client:
        client.update_work_pool("control", WorkPoolUpdate(concurrency_limit=control_limit))
    try:
        started = subprocess.run([str(BIN / "prefect"), "deployment", "run", "retrain/nightly", "--params",
                                  json.dumps(params)], cwd=REPO, env=stack["client_env"], capture_output=True,
                                 text=True, timeout=120)
        parent_id = re.search(r"UUID:\s*([0-9a-f-]{36})", started.stdout).group(1)
        deadline = time.monotonic() + 120
        with prefect_client(api) as client:
            while not (run := client.read_flow_run(parent_id)).state.is_final():
                assert time.monotonic() < deadline, procs.all_logs()
                time.sleep(1)
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
    finally:
        with prefect_client(api) as client:
            client.update_work_pool("control", WorkPoolUpdate(concurrency_limit=None))
    assert run.state.is_failed(), run.state
    assert expected in str(run.state.result(raise_on_failure=False)), run.state.message
    assert not children  # nothing was dispatched


@pytest.mark.slow
def test_nightly_sweep_maps_each_trial_onto_the_train_pool(stack):
    """retrain/nightly-sweep: one prepare-data flow run, one train/gpu flow run per trial (subflows of the
    parent, on the gpu pool), the best trial chosen. Last in the file: the nightly test counts train/gpu runs."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    params = {"preset": "timemachine-char", "overrides": TINY,
              "sweep": {"grid": {"train.lr": [0.004, 0.002]}},
              "options": {"dispatch": "deployments", "dispatch_poll_s": 1, "dispatch_timeout_s": 240,
                          "register_model": False, "sample_tokens": 10, "grace_s": 5}}
    started = subprocess.run([str(BIN / "prefect"), "deployment", "run", "retrain/nightly-sweep", "--params",
                              json.dumps(params)], cwd=REPO, env=stack["client_env"], capture_output=True, text=True,
                             timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    parent_id = re.search(r"UUID:\s*([0-9a-f-]{36})", started.stdout).group(1)
    deadline = time.monotonic() + 300
    with prefect_client(stack["api"]) as client:
        while not ((parent := client.read_flow_run(parent_id)).state and parent.state.is_final()):
            assert time.monotonic() < deadline, f"retrain still {parent.state_name}\n{stack['procs'].all_logs()}"
            time.sleep(1)
        assert parent.state.is_completed(), f"{parent.state_name}: {parent.state.message}\n{stack['procs'].all_logs()}"
        result = parent.state.result()
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
        pools = sorted((client.read_flow(c.flow_id).name, c.work_pool_name, c.state_name) for c in children)
    assert pools == [("prepare-data", "cpu", "Completed"), ("train", "gpu", "Completed"), ("train", "gpu", "Completed")]
    trials = result["sweep"]["trials"]
    assert sorted(t["status"] for t in trials) == ["best", "finished"] and all(t["val_ppl"] for t in trials)
    assert result["run"]["run_dir"] == next(t for t in trials if t["status"] == "best")["run_dir"]
