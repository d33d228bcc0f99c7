"""Operating the distributed pipeline: a Prefect server, work pools, deployments, workers.

    rnnlm server [--port 4200]          prefect server start on 127.0.0.1 (SQLite, or Postgres via
                                        PREFECT_API_DATABASE_CONNECTION_URL / --database-url)
    rnnlm deploy                        create the work pools, then `prefect deploy --all` from
                                        deployments/prefect.yaml (run from the repository root)
    rnnlm worker --pool cpu             a process worker for one pool, with the environment the
                                        flow runs need (shared storage, persisted results)

Each helper builds an argv and an environment (``*_command`` / ``*_env``), so tests and
supervisors (systemd, a Kubernetes manifest) can start the same thing themselves; the
CLI ``exec``s them, so the server or worker *is* the process a supervisor started.
See deployments/README.md.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Optional

from pipeline import storage

REPO_DIR = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO_DIR / "deployments" / "prefect.yaml"
DEFAULT_API_URL = "http://127.0.0.1:4200/api"
ENV_REPO_DIR = "RNNLM_REPO_DIR"  # where the worker's host has this repository (the pull step's working dir)

# Nothing the project starts may contact a host its user did not configure: Prefect's server
# analytics and client SDK events (DO_NOT_TRACK), MLflow's client and server telemetry.
TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}

# The pools deployments/prefect.yaml uses: retrain waits on its own pool so that it never
# holds a slot the stages it waits for need.
POOLS = {
    "control": "orchestration: the retrain parent (waits on its stages, registers the model)",
    "cpu": "data preparation (prepare-data)",
    "gpu": "training and evaluation (train)",
}


def prefect_executable() -> str:
    """The ``prefect`` next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).with_name("prefect")
    return str(local) if local.exists() else (shutil.which("prefect") or "prefect")


def api_url(url: Optional[str] = None) -> str:
    return url or os.environ.get("PREFECT_API_URL") or DEFAULT_API_URL


# ----------------------------------------------------------------------------------- server


def server_command(host: str = "127.0.0.1", port: int = 4200) -> list[str]:
    return [prefect_executable(), "server", "start", "--host", host, "--port", str(port)]


def server_env(home: Optional[str] = None, database_url: Optional[str] = None, root: Optional[str] = None,
               base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The server's environment: ``PREFECT_HOME`` (default ``<root>/prefect`` for a local storage
    root, which holds the SQLite database), telemetry off, and the database URL if given
    (``postgresql+asyncpg://user:pass@host:5432/prefect``)."""
    env = dict(os.environ if base is None else base)
    env.pop("PREFECT_API_URL", None)  # the server is the API; a client setting would only confuse it
    if home is None and "PREFECT_HOME" not in env:
        store = storage.storage_root(root or env.get(storage.ENV_STORAGE))
        if storage.is_local(store):
            home = os.path.join(storage.local_path(store), "prefect")
    if home:
        os.makedirs(home, exist_ok=True)
        env["PREFECT_HOME"] = str(home)
    # (also: analytics' heartbeat races the first migrations on a fresh SQLite file, "database is locked")
    env.update(TELEMETRY_OFF)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    return env


# --------------------------------------------------------------------------- embedded server


class EmbeddedServer:
    """The temporary Prefect server of ``rnnlm run``: the very process Prefect's own ephemeral mode
    starts (uvicorn on ``prefect.server.api.server:create_app``, SQLite in ``home``), started by us.

    Prefect would start it only when the flow is called, after importing its whole server API
    in this process to do so; started first, it migrates its database on another core while
    this process imports the pipeline. As Prefect's, it is one per process and stops at exit,
    after Prefect's client workers have sent their queued logs and events; it also dies with
    this process when that is killed outright (``PR_SET_PDEATHSIG``).
    """

    def __init__(self, home: str, startup_timeout_s: float = 120.0):
        self.home, self.startup_timeout_s = home, startup_timeout_s
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""
        self.fresh = False  # a new database: kept as the template once the server answers

    def command(self, port: int) -> list[str]:
        site_packages = Path(importlib.util.find_spec("prefect").origin).parents[1]  # without importing prefect
        return [sys.executable, "-m", "uvicorn", "--app-dir", str(site_packages), "--factory",
                "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "error", "--lifespan", "on"]

    def start(self) -> "EmbeddedServer":
        os.makedirs(self.home, exist_ok=True)
        self.fresh = _uses_home_sqlite() and not os.path.exists(os.path.join(self.home, PREFECT_DB))
        if self.fresh:
            _copy_template(self.home)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(TELEMETRY_OFF, PREFECT_HOME=self.home, PREFECT_UI_ENABLED="0",
                   PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
        self.url = f"http://127.0.0.1:{port}/api"
        self.proc = subprocess.Popen(self.command(port), env=env, preexec_fn=_die_with_parent)
        atexit.register(self.stop)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self) -> str:
        """Block until the server answers its health check; its API URL."""
        import httpx

        # (logged here, not at the start: this process's logging is set up by now)
        logging.getLogger("prefect").info("Starting temporary server on %s", self.url.removesuffix("/api"))
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the temporary Prefect server (PREFECT_HOME={self.home}) exited with "
                                       f"{self.proc.returncode} while starting")
                try:
                    if client.get(f"{self.url}/health", timeout=5).status_code == 200:
                        if self.fresh:
                            _save_template(self.home)
                        return self.url
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"the temporary Prefect server (PREFECT_HOME={self.home}) did not answer within "
                           f"{self.startup_timeout_s:.0f} s")

    def stop(self) -> None:
        if self.running():
            logging.getLogger("prefect").info("Stopping temporary server on %s", self.url.removesuffix("/api"))
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# A new PREFECT_HOME's SQLite database runs every Alembic migration before the server answers,
# the largest part of a first run's start-up. The database as it is when a fresh server first
# answers (migrated, block types registered, no runs yet) is kept per Prefect version and
# copied into the next new home; the server then finds it at the latest migration.
PREFECT_DB = "prefect.db"
TEMPLATE_FILES = (PREFECT_DB, "memo_store.toml")  # the memo: block types already registered


def template_dir() -> Path:
    """``$XDG_CACHE_HOME/rnnlm/prefect-<version>`` (default ``~/.cache``)."""
    from importlib.metadata import version

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "rnnlm" / f"prefect-{version('prefect')}"


def _uses_home_sqlite() -> bool:
    """The server keeps its database in PREFECT_HOME (no database URL configured)."""
    return not any(os.environ.get(k) for k in ("PREFECT_API_DATABASE_CONNECTION_URL",
                                                 "PREFECT_SERVER_DATABASE_CONNECTION_URL"))


def _copy_template(home: str) -> None:
    """A new home starts from the template, if there is one (else Prefect migrates a new database)."""
    template = template_dir()
    try:
        if not (template / PREFECT_DB).is_file():
            return
        for name in TEMPLATE_FILES:
            if (template / name).is_file():
                tmp = os.path.join(home, f".{name}.tmp-{os.getpid()}")
                shutil.copyfile(template / name, tmp)
                os.replace(tmp, os.path.join(home, name))
    except OSError as e:  # an optimisation only: Prefect creates the database itself
        logging.getLogger(__name__).debug("not using the Prefect database template %s: %s", template, e)
        for name in TEMPLATE_FILES:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(home, name))


def _save_template(home: str) -> None:
    """Keep the database of a fresh server that has just answered (SQLite's online backup: a
    consistent copy while the server runs), unless a template exists."""
    import sqlite3

    template = template_dir()
    if (template / PREFECT_DB).is_file():
        return
    tmp = template.with_name(f".{template.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(os.path.join(home, PREFECT_DB))) as src, \
                contextlib.closing(sqlite3.connect(tmp / PREFECT_DB)) as dst:
            src.backup(dst)
        memo = Path(home) / TEMPLATE_FILES[1]
        if memo.is_file():
            shutil.copyfile(memo, tmp / memo.name)
        os.replace(tmp, template)  # whole or not at all; a concurrent first run may have won
    except (OSError, sqlite3.Error) as e:
        logging.getLogger(__name__).debug("could not keep a Prefect database template at %s: %s", template, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_embedded: Optional[EmbeddedServer] = None


def embedded_server(home: str, startup_timeout_s: float = 120.0) -> EmbeddedServer:
    """This process's temporary server, started on first use (in ``home``) and reused after."""
    global _embedded
    if _embedded is None or not _embedded.running():
        _embedded = EmbeddedServer(home, startup_timeout_s).start()
    return _embedded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------ pools


def ensure_pools(names=tuple(POOLS), limits: Optional[Mapping[str, int]] = None,
                 url: Optional[str] = None) -> dict[str, str]:
    """Create the ``process`` work pools that do not exist yet (existing ones are left as they
    are, their limits included); set the given concurrency limits. Returns name -> created/exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    limits = dict(limits or {})
    out = {}
    with temporary_settings(updates={PREFECT_API_URL: api_url(url)}), get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_work_pool(name)
                out[name] = "exists"
            except ObjectNotFound:
                try:
                    client.create_work_pool(WorkPoolCreate(
                        name=name, type="process", description=POOLS.get(name),
                        base_job_template=ProcessWorker.get_default_base_job_template()))
                    out[name] = "created"
                except ObjectAlreadyExists:
                    out[name] = "exists"
            if name in limits:
                client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limits[name]))
    return out


# ------------------------------------------------------------------------------ deployments


def deploy_command(prefect_file: Optional[str] = None, names: tuple[str, ...] = ()) -> list[str]:
    """``prefect deploy`` for every deployment in the file (or the ``flow/deployment`` names given)."""
    cmd = [prefect_executable(), "--no-prompt", "deploy", "--prefect-file", str(prefect_file or PREFECT_FILE)]
    return cmd + ([a for n in names for a in ("--name", n)] if names else ["--all"])


def pull_step_env_vars(prefect_file: Optional[str] = None) -> set[str]:
    """The ``{{ $VAR }}`` names used in the file's pull steps (top level and per deployment)."""
    import yaml

    spec = yaml.safe_load(Path(prefect_file or PREFECT_FILE).read_text()) or {}
    pulls = [spec.get("pull")] + [d.get("pull") for d in spec.get("deployments") or []]
    return set(re.findall(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", repr(pulls)))


def deploy(prefect_file: Optional[str] = None, names: tuple[str, ...] = (), url: Optional[str] = None,
           pools: bool = True, env: Optional[Mapping[str, str]] = None) -> int:
    """Create the pools, then run ``prefect deploy`` from the repository root (entrypoints in
    prefect.yaml are relative to it, whatever the caller's working directory).

    ``prefect deploy`` (3.8) fills ``{{ $VAR }}`` in pull steps from the *deploying* shell
    when the variable is set there, and stores the placeholder as written when it is not;
    the worker then fills it from its own environment when a run starts. So the variables
    the pull steps use are removed from the deploy's environment: a deployer's own
    ``RNNLM_REPO_DIR`` must never become every worker's working directory.
    """
    if pools:
        for name, what in ensure_pools(url=url).items():
            print(f"work pool {name}: {what}", flush=True)
    run_env = {**(os.environ if env is None else env), "PREFECT_API_URL": api_url(url)}
    for var in pull_step_env_vars(prefect_file):
        run_env.pop(var, None)
    return subprocess.call(deploy_command(prefect_file, names), cwd=REPO_DIR, env=run_env)


# ---------------------------------------------------------------------------------- workers


def worker_command(pool: str, name: Optional[str] = None, limit: Optional[int] = None) -> list[str]:
    cmd = [prefect_executable(), "worker", "start", "--pool", pool, "--type", "process"]
    if name:
        cmd += ["--name", name]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def worker_env(root: Optional[str] = None, repo_dir: Optional[str] = None, url: Optional[str] = None,
               results_block: Optional[str] = None, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """What a worker (and so every flow run it starts) needs.

    * ``PREFECT_API_URL``; telemetry off (:data:`TELEMETRY_OFF`);
    * ``RNNLM_STORAGE``: the shared artifact root (the same URL on every host; a local path
      only works when all workers share the directory, as in tests);
    * ``RNNLM_REPO_DIR``: where this host has the repository: the deployments' pull step
      changes into it before loading the flow;
    * persisted flow results on the shared root: ``PREFECT_RESULTS_PERSIST_BY_DEFAULT``, JSON,
      ``PREFECT_RESULTS_LOCAL_STORAGE_PATH=<root>/prefect-results/flow-runs`` for a local
      root, or ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`` (a saved remote-file-system block,
      see :func:`results_block_for`) for s3:// / gs://. The retrain parent reads its
      children's results from there.
    """
    env = {**(os.environ if base is None else base), **TELEMETRY_OFF}
    store = storage.storage_root(root or env.get(storage.ENV_STORAGE))
    env[storage.ENV_STORAGE] = store
    env["PREFECT_API_URL"] = api_url(url or env.get("PREFECT_API_URL"))
    env[ENV_REPO_DIR] = str(repo_dir or env.get(ENV_REPO_DIR) or REPO_DIR)
    env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
    env.setdefault("PREFECT_RESULTS_DEFAULT_SERIALIZER", "json")
    if storage.is_local(store):
        path = os.path.join(storage.local_path(store), "prefect-results", "flow-runs")
        os.makedirs(path, exist_ok=True)
        env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = path
    elif results_block:
        env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = results_block
    return env


def results_block_for(root: str, url: Optional[str] = None) -> str:
    """Save (idempotently) a remote-file-system block at ``<root>/prefect-results/flow-runs``; its slug."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.caching import result_storage_block

    with temporary_settings(updates={PREFECT_API_URL: api_url(url)}):
        return result_storage_block(storage.join(root, "prefect-results", "flow-runs"))


def prepare_tracking_db(env: Mapping[str, str]) -> Optional[str]:
    """Create a SQLite MLflow database once before workers use it concurrently (no-op otherwise)."""
    from pipeline.registry.tracking import ENV_TRACKING_URI, ensure_tracking_db, local_tracking_uri, sqlite_path

    uri = env.get(ENV_TRACKING_URI)
    if not uri:
        store = env.get(storage.ENV_STORAGE)
        if not store or not storage.is_local(store):
            return None
        uri = local_tracking_uri(store)
    path = sqlite_path(uri)
    if path and not os.path.exists(path):
        ensure_tracking_db(uri)
    return uri


def exec_(cmd: list[str], env: Mapping[str, str], cwd: Optional[Path] = None) -> None:
    """Replace this process with ``cmd`` (signals from a supervisor reach the server/worker itself)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if cwd:
        os.chdir(cwd)
    os.execvpe(cmd[0], cmd, dict(env))
