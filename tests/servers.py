"""Real servers for the tests, each on a free 127.0.0.1 port: moto's S3 API, ``redis-server``,
and a throwaway PostgreSQL cluster, plus the process bookkeeping every server test shares.

Every process is started in its own process group and stopped by PID (group, then any stray
descendant). A missing dependency skips the test with a message naming what to install
(docs/development.md, "Running the tests"); under CI (``CI=true``) tests/conftest.py turns such a skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
INSTALL = {
    "moto": "the test servers' Python packages: pip install -e '.[test]'",
    "s3fs": "the S3 filesystem: pip install -e '.[s3]'",
    "prefect_redis": "the Redis lock manager: pip install -e '.[redis]'",
    "redis-server": "Redis: apt-get install redis-server",
    "postgres": "PostgreSQL: apt-get install postgresql",
}
MISSING = "missing test dependency: "  # the skip message prefix tests/conftest.py fails on under CI
# Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<version>/bin.
POSTGRES_BINS = ("initdb", "pg_ctl", "postgres")


def require(*what: str) -> None:
    """Skip the calling test unless every module / program in ``what`` is installed."""
    import importlib.util

    missing = [w for w in what if (importlib.util.find_spec(w) is None if w in ("moto", "s3fs", "prefect_redis")
                                   else not _program(w))]
    if missing:
        pytest.skip(MISSING + "; ".join(INSTALL[w] for w in missing))


def _program(name: str) -> str | None:
    if name == "postgres":
        return postgres_bin_dir()
    return shutil.which(name)


def postgres_bin_dir() -> str | None:
    if all(shutil.which(b) for b in POSTGRES_BINS):
        return str(Path(shutil.which("initdb")).parent)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return str(found[-1].parent) if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Subprocesses in their own process groups, logs to files, all stopped by PID at the end."""

    def __init__(self, logs: Path):
        self.logs = Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen, object]] = []

    def start(self, name: str, cmd: list[str], env: dict | None = None, cwd=None, **popen) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                **popen)
        self.procs.append((name, proc, log))
        return proc

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def all_logs(self) -> str:
        return "\n".join(f"----- {name} -----\n{self.log(name)}" for name, _, _ in self.procs)

    def stop_all(self) -> None:
        """Stop every process: SIGTERM to all, the last started (clients) first and servers last, then
        one grace period for all of them together (a stuck process costs it once, not once each)."""
        started = list(reversed(self.procs))
        t = time.monotonic()
        stopped = stop_processes([proc for _, proc, _ in started])
        for (name, proc, log), ok in zip(started, stopped):
            if not ok:
                # A process that ignores SIGTERM is a defect of its own (and costs every run the grace
                # period): say which, in pytest's warnings summary.
                warnings.warn(f"{name} (pid {proc.pid}) was still running {time.monotonic() - t:.0f} s after "
                              f"SIGTERM and was killed; its log: {self.logs / (name + '.log')}", stacklevel=2)
            log.close()
        self.procs.clear()


def stop_processes(procs: list[subprocess.Popen], grace_s: float = 15) -> list[bool]:
    """SIGTERM the process group of each of ``procs`` (started with start_new_session), in order;
    SIGKILL the groups still running ``grace_s`` later; also kill any descendant that left its
    group. Returns, for each, whether it stopped on SIGTERM."""
    import psutil

    descendants = []
    for proc in procs:
        try:
            descendants += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    stopped_on_sigterm = [proc.poll() is not None for proc in procs]  # already gone: nothing ignored
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        # SIGTERM every group (an exited leader may have left members); SIGKILL where the leader runs on
        running = [i for i, proc in enumerate(procs) if sig == signal.SIGTERM or proc.poll() is None]
        for i in running:
            try:
                os.killpg(procs[i].pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        for i in running:
            try:
                procs[i].wait(timeout=max(0.0, deadline - time.monotonic()))
                stopped_on_sigterm[i] = sig == signal.SIGTERM
            except subprocess.TimeoutExpired:
                pass
    for d in descendants:
        try:
            d.kill()
        except psutil.NoSuchProcess:
            pass
    return stopped_on_sigterm


def wait_until(ready, proc: subprocess.Popen, procs: Processes, name: str, timeout: float = 120) -> None:
    """Poll ``ready()`` until it is true; fail with the server's log if it exits or never gets there."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{procs.log(name)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} not ready after {timeout}s:\n{procs.log(name)}")
        time.sleep(0.3)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_http(url: str, proc: subprocess.Popen, procs: Processes, name: str, timeout: float = 120) -> None:
    wait_until(lambda: http_ok(url), proc, procs, name, timeout)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def clean_env(**extra) -> dict:
    """This environment minus anything that would point a child at another server or store."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "RNNLM_", "AWS_", "FSSPEC_"))}
    return {**env, **extra}


# ----------------------------------------------------------------------------------- S3


@dataclass
class S3Server:
    """moto's S3 API on 127.0.0.1. ``env`` is everything a process (this one, or a child: a
    worker, a trainer, ``mlflow server``) needs to use it through s3fs / boto3."""

    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint,  # botocore (s3fs, boto3, mlflow) send S3 calls here
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
        }

    def new_bucket(self, prefix: str = "rnnlm") -> str:
        """A fresh, empty bucket: ``s3://<name>``."""
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=name)
        return f"s3://{name}"


def start_s3(procs: Processes) -> S3Server:
    require("moto", "s3fs")
    port = free_port()
    proc = procs.start("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                       env=clean_env())
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(f"{endpoint}/moto-api/", proc, procs, "moto")
    return S3Server(endpoint)


# -------------------------------------------------------------------------------- Redis


def start_redis(procs: Processes, directory: Path) -> str:
    """``redis-server`` on a free port, data in ``directory``, no persistence; returns its URL."""
    require("redis-server")
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    proc = procs.start("redis", [shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(port),
                                 "--dir", str(directory), "--save", "", "--appendonly", "no",
                                 "--protected-mode", "yes"])
    wait_until(lambda: port_open(port), proc, procs, "redis", timeout=30)
    return f"redis://127.0.0.1:{port}/0"


# ----------------------------------------------------------------------------- Postgres


def _as_postgres_user() -> dict:
    """Popen arguments that run a PostgreSQL program as the ``postgres`` user when we are root:
    PostgreSQL refuses to run as root, and CI runs as root."""
    if os.geteuid() != 0:
        return {}
    import pwd

    user = pwd.getpwnam("postgres")

    def demote():
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return {"preexec_fn": demote}


def start_postgres(procs: Processes) -> tuple[str, Path]:
    """A throwaway cluster (initdb in a fresh temp dir), trust auth on 127.0.0.1 only, a database
    ``prefect``; returns its SQLAlchemy asyncpg URL and the directory (the caller removes it after
    ``procs.stop_all()``). ``postgres`` runs in the foreground, so the process stopped by PID is the
    server itself. The directory is outside pytest's tmp_path, which the ``postgres`` user cannot enter."""
    import tempfile

    require("postgres")
    bindir = Path(postgres_bin_dir())
    demote = _as_postgres_user()
    directory = Path(tempfile.mkdtemp(prefix="rnnlm-postgres-"))
    if demote:
        shutil.chown(directory, "postgres", "postgres")
    data = directory / "data"
    env = clean_env(LC_ALL="C.UTF-8", LANG="C.UTF-8")
    subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "rnnlm", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True, env=env, timeout=120, **demote)
    port = free_port()
    proc = procs.start("postgres", [str(bindir / "postgres"), "-D", str(data), "-p", str(port),
                                    "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={directory}",
                                    "-c", "fsync=off"], env=env, **demote)
    wait_until(lambda: port_open(port), proc, procs, "postgres", timeout=60)
    createdb = [str(bindir / "createdb") if (bindir / "createdb").exists() else "createdb",
                "-h", "127.0.0.1", "-p", str(port), "-U", "rnnlm", "prefect"]
    for _ in range(20):  # the port opens a moment before the server accepts connections
        made = subprocess.run(createdb, capture_output=True, text=True, env=env, timeout=30)
        if made.returncode == 0:
            break
        time.sleep(0.5)
    assert made.returncode == 0, made.stderr + procs.log("postgres")
    return f"postgresql+asyncpg://rnnlm@127.0.0.1:{port}/prefect", directory
