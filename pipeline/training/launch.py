"""Start a training run as a child process and turn its outcome into a value or an error.

``launch_training`` runs ``python -m pipeline.training.train`` directly (one process), or
under torchrun (``python -m torch.distributed.run``; ``--standalone`` on one
node, c10d rendezvous across nodes), or on a Ray cluster (``ray=RayCluster(...)``:
``pipeline.training.ray_launch``'s driver runs Ray Train workers). It streams the child's output line by line
to a callback, so an orchestrator (a Prefect task) can forward logs and the
JSON metric lines, and it maps the outcome:

* exit 0                                  -> LaunchResult (the run directory)
* FAILED.json with ``retryable: false``   -> NonFiniteLossError / ConfigError / ... (do not retry)
* anything else (a killed rank, lost node) -> TrainingFailedError, retryable

torchrun exits 1 whatever its workers' codes were, which is why the verdict
comes from FAILED.json (written by rank 0) rather than from the exit code.
The child's JSON lines are also published as progress events (``pipeline.progress``) for a
display in this process; its throttled ``"progress"`` lines (asked for through
``RNNLM_PROGRESS_EVERY_S``) go only there, not to ``on_line`` or the metrics.
A SIGTERM to this process is forwarded to the child, which gets ``grace_s``
seconds before the whole process tree is killed; a launcher killed outright
(SIGKILL) takes the trainer with it: every rank watches the launcher's pid
(``processes.exit_with_launcher``) and stops as soon as it is gone.

One run directory, one trainer: on a local file system the launch holds an OS
lock on ``<run_dir>/.lock`` (``filelock``; released by the kernel if the launcher
dies), so a second launch of the same run waits for the first and then finds
its checkpoints (a finished run is not trained again). Nothing here locks a
remote run directory (s3://, gs://...): there, one run id is trained by one
launcher at a time because the orchestrator's stage lock (the train task's cache
lock, ``tasks.caching``) serialises it; two ``rnnlm train`` by hand against the
same remote root are not protected. A multi-node launch (``nnodes > 1``) takes
no lock: its launchers are one job sharing the directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import filelock
import yaml

from pipeline import progress, storage
from pipeline.training import cpu_threads
from pipeline.code_version import code_digest
from pipeline.config import ModelConfig, RunConfig, TrainConfig
from pipeline.errors import (CheckpointError, ConfigError, DatasetError, NonFiniteLossError,
                             PipelineError)
from pipeline.training.processes import LAUNCHER_PID_ENV, Stopper
from pipeline.training.ray_launch import RayCluster, driver_env, ray_command, worker_line

log = logging.getLogger(__name__)

NON_RETRYABLE = {"non_finite_loss": NonFiniteLossError, "bad_config": ConfigError,
                 "bad_dataset": DatasetError, "bad_checkpoint": CheckpointError}


# Bump when the trainer's outputs or the run id change meaning: it is part of every run's address.
# 2: the run id leaves out the budget (BUDGET_KEYS); validation uses pipeline.model.evaluate's one setting.
TRAIN_FORMAT_VERSION = 2
# Train-config keys that say how long to train and how to keep house, not what a step
# computes: left out of the run id, so a bigger budget continues the same run.
# (checkpoint_every_steps stays in: a mid-epoch checkpoint reseeds the dropout RNG.)
BUDGET_KEYS = frozenset({"epochs", "max_minutes", "max_steps", "keep_checkpoints", "device"})
LOCK_FILE = ".lock"


def run_id(dataset_id: str, model_cfg: ModelConfig, train_cfg: TrainConfig) -> str:
    """The content address of a training run: which data, which model, which loop (not how long),
    and which code.

    A retried or repeated run with the same inputs lands in the same directory and
    resumes from its checkpoints instead of starting over; so does one asking for
    more epochs, minutes or steps (``BUDGET_KEYS``), which continues from the last checkpoint.
    """
    train = {k: v for k, v in train_cfg.model_dump(mode="json").items() if k not in BUDGET_KEYS}
    # The code that trains it too (pipeline.code_version): an upgrade trains anew, never
    # resumes or reuses a run the old code wrote.
    return storage.stable_hash({"version": TRAIN_FORMAT_VERSION, "code": code_digest("train"),
                                "dataset_id": dataset_id, "model": model_cfg.model_dump(mode="json"),
                                "train": train}, 24)


def run_directory(root: str, dataset_id: str, model_cfg: ModelConfig, train_cfg: TrainConfig) -> str:
    return storage.join(root, "runs", run_id(dataset_id, model_cfg, train_cfg))


# libgomp (torch's OpenMP on Linux) lets a thread that waits at a barrier spin 300,000 times
# before it sleeps. Measured on a 2-core host (bench/throughput_shared_host.py,
# docs/benchmarks.md): alone or beside a process using 20% of one core, spinning is fastest and PASSIVE (sleep at once)
# costs a third to a half of the speed; with more busy threads than cores (a second trainer
# beside it) spinning collapses (4x slower) while PASSIVE keeps the machine's throughput. So the
# launcher looks at the host just before it starts the trainer: PASSIVE where the CPUs already
# busy plus the trainer's threads would oversubscribe the cores, libgomp's default otherwise.
# libgomp reads this when torch loads, so it goes into the trainer's environment; an explicit
# OMP_WAIT_POLICY or GOMP_SPINCOUNT in the caller's environment (or ``env``) wins.
WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
BUSY_PROBE_S = 0.3


def busy_cpus() -> float:
    """How many of our usable CPUs the host's processes keep busy now (a short sample)."""
    return cpu_threads.busy_cpus(BUSY_PROBE_S)


def wait_policy(threads: int, busy: float, cpus: int) -> dict[str, str]:
    """PASSIVE waiting where ``threads`` more would oversubscribe ``cpus`` (``busy`` already in use)."""
    return {"OMP_WAIT_POLICY": "PASSIVE"} if busy + threads > cpus + 0.5 else {}


def trainer_env(env: dict[str, str] | None = None, *, nproc: int = 1) -> dict[str, str]:
    """The trainer child's environment: ours, ``env`` on top, and where neither says how OpenMP
    threads wait, the policy for this host's load now (``wait_policy``) for ``nproc`` local ranks."""
    merged = {**os.environ, **(env or {})}
    if not any(key in merged for key in WAIT_ENV):
        cpus = len(cpu_threads.usable_cpus())
        threads = cpu_threads.threads_per_rank(nproc, merged) * nproc  # what the ranks will take
        policy = wait_policy(threads, busy := busy_cpus(), cpus)
        log.info("OpenMP waiting: %s (%.1f of %d CPUs busy, %d trainer threads)",
                 "passive" if policy else "libgomp's default (spin, then sleep)", busy, cpus, threads)
        merged.update(policy)
    merged.setdefault(progress.EVERY_S_ENV, str(progress.DEFAULT_EVERY_S))
    return {**merged, "PYTHONUNBUFFERED": "1"}


class TrainingFailedError(PipelineError):
    """The training process failed in a way that trying again may fix (killed, lost node, OOM)."""

    retryable = True


@dataclass
class LaunchResult:
    run_dir: str
    returncode: int
    metrics: list[dict[str, Any]] = field(default_factory=list)  # the JSON events, in order
    result: dict[str, Any] | None = None  # result.json


def training_command(run_dir: str, dataset_uri: str, config_path: str, *, nproc: int = 1,
                     nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
                     rdzv_backend: str = "c10d", rdzv_id: str = "rnnlm", max_restarts: int = 0,
                     checkpoint_dir: str | None = None, python: str = sys.executable) -> list[str]:
    """The argv that runs the trainer: plain Python for one process, else torchrun."""
    trainer = ["-m", "pipeline.training.train", "--run-dir", run_dir, "--dataset", dataset_uri,
               "--config", config_path]
    if checkpoint_dir:
        trainer += ["--checkpoint-dir", checkpoint_dir]
    if nproc == 1 and nnodes == 1:
        return [python, *trainer]
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd += ["--standalone"]
    else:
        if rdzv_endpoint is None:
            raise ConfigError("multi-node training needs rdzv_endpoint (host:port of node 0)")
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--rdzv-backend={rdzv_backend}",
                f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    return cmd + trainer


def launch_training(run_dir: str, dataset_uri: str, config: str | RunConfig, nproc: int = 1, *,
                    nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
                    rdzv_backend: str = "c10d", rdzv_id: str = "rnnlm", max_restarts: int = 0,
                    checkpoint_dir: str | None = None, ray: RayCluster | None = None,
                    on_line: Callable[[str], None] | None = None,
                    env: dict[str, str] | None = None, grace_s: float = 30.0,
                    python: str = sys.executable) -> LaunchResult:
    """Run training to completion; see the module docstring for the outcome mapping.

    ``config`` is a RunConfig YAML path/URL or a RunConfig (written to
    ``<run_dir>/run_config.yaml`` for the child). ``on_line`` gets every output
    line of the child (stdout and stderr merged), without the newline. With ``ray``
    the child is a Ray Train driver (``pipeline.training.ray_launch``) running ``nproc`` workers
    on that cluster instead of torchrun.
    """
    run_dir = storage.local_path(run_dir) if storage.is_local(run_dir) else run_dir
    fs, path = storage.filesystem(run_dir)
    fs.makedirs(path, exist_ok=True)
    with _run_dir_lock(run_dir, nnodes, on_line):
        return _launch(run_dir, dataset_uri, config, nproc, nnodes=nnodes, node_rank=node_rank,
                       rdzv_endpoint=rdzv_endpoint, rdzv_backend=rdzv_backend, rdzv_id=rdzv_id,
                       max_restarts=max_restarts, checkpoint_dir=checkpoint_dir, ray=ray, on_line=on_line,
                       env=env, grace_s=grace_s, python=python)


@contextlib.contextmanager
def _run_dir_lock(run_dir: str, nnodes: int, on_line: Callable[[str], None] | None):
    """Hold ``<run_dir>/.lock`` (local, single-node runs; see the module docstring)."""
    if nnodes > 1 or not storage.is_local(run_dir):
        yield
        return
    lock = filelock.FileLock(os.path.join(run_dir, LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        message = f"another launch is training {run_dir}: waiting for it to finish"
        log.info(message)
        if on_line is not None:
            on_line(message)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _launch(run_dir: str, dataset_uri: str, config: str | RunConfig, nproc: int, *, nnodes: int,
            node_rank: int, rdzv_endpoint: str | None, rdzv_backend: str, rdzv_id: str, max_restarts: int,
            checkpoint_dir: str | None, ray: RayCluster | None, on_line: Callable[[str], None] | None,
            env: dict[str, str] | None, grace_s: float, python: str) -> LaunchResult:
    _check_config(config, dataset_uri)
    config_path, failed_uri = _prepare_attempt(run_dir, config)
    if ray is None:
        cmd = training_command(run_dir, dataset_uri, config_path, nproc=nproc, nnodes=nnodes,
                               node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_backend=rdzv_backend,
                               rdzv_id=rdzv_id, max_restarts=max_restarts, checkpoint_dir=checkpoint_dir,
                               python=python)
        # Every rank watches this process and stops when it is gone (exit_with_launcher);
        # not under Ray, whose workers may run on other hosts where this pid means nothing.
        clean, launcher_env = str, {LAUNCHER_PID_ENV: str(os.getpid())}
    else:
        cmd = ray_command(run_dir, dataset_uri, config_path, workers=nproc, cluster=ray,
                          checkpoint_dir=checkpoint_dir, python=python)
        clean, launcher_env = worker_line, driver_env()
    child_env = {**trainer_env(env, nproc=nproc), **launcher_env}
    log.info("launching: %s", " ".join(cmd))
    returncode, metrics, tail = _run_child(cmd, child_env, clean, on_line, grace_s, run_dir)
    return _outcome(run_dir, returncode, metrics, tail, failed_uri)


def _check_config(config: str | RunConfig, dataset_uri: str) -> None:
    """What only the dataset can tell about the config, checked before a trainer starts
    (a ConfigError: not retried), not by a trainer that exits 1 after its start-up."""
    from pipeline.config_sources import load_config
    from pipeline.data.training_data import dataset_vocab_size
    from pipeline.model.models import check_fits_vocabulary

    cfg = config if isinstance(config, RunConfig) else load_config(RunConfig, config)
    if cfg.model.adaptive_cutoffs:
        check_fits_vocabulary(cfg.model, dataset_vocab_size(dataset_uri))


def _prepare_attempt(run_dir: str, config: str | RunConfig) -> tuple[str, str]:
    """Write a RunConfig where the child reads it and clear an earlier attempt's FAILED.json;
    returns the config's path and FAILED.json's URI."""
    fs = storage.filesystem(run_dir)[0]
    if isinstance(config, RunConfig):
        config_path = storage.join(run_dir, "run_config.yaml")
        storage.write_bytes_atomic(config_path, yaml.safe_dump(config.model_dump(mode="json")).encode())
    else:
        config_path = str(config)
    failed_uri = storage.join(run_dir, "FAILED.json")
    if storage.exists(failed_uri):  # a verdict from an earlier attempt must not be read as ours
        fs.rm(storage.filesystem(failed_uri)[1])
    return config_path, failed_uri


def _run_child(cmd: list[str], child_env: dict[str, str], clean: Callable[[str], str],
               on_line: Callable[[str], None] | None, grace_s: float,
               run_dir: str) -> tuple[int, list[dict[str, Any]], deque[str]]:
    """Run the child to its end, streaming its lines; its exit code, JSON events and last lines.

    Raises TrainingFailedError when a SIGTERM to us stopped it.
    """
    metrics: list[dict[str, Any]] = []
    tail: deque[str] = deque(maxlen=50)
    # A new session: a Ctrl-C meant for us is not also delivered straight to the
    # child; we forward signals ourselves and can kill the whole tree.
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1, env=child_env, start_new_session=True)
    stopper = Stopper(child, grace_s)
    previous = stopper.install()
    try:
        assert child.stdout is not None
        for raw in child.stdout:
            line = clean(raw.rstrip("\n"))
            event = _event(line)
            if event is not None:
                progress.publish(event)
                if event.get("event") == "progress":
                    continue
                metrics.append(event)
            tail.append(line)
            if on_line is not None:
                on_line(line)
        returncode = child.wait()
    except BaseException:  # the caller is cancelled or interrupted: take the child down too
        stopper.stop()
        raise
    finally:
        stopper.uninstall(previous)

    if stopper.signalled:
        stopper.redeliver(previous)
        raise TrainingFailedError(f"training in {run_dir} was stopped by SIGTERM (exit {returncode})")
    return returncode, metrics, tail


def _event(line: str) -> dict[str, Any] | None:
    """The JSON object a trainer line holds, else None."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def _outcome(run_dir: str, returncode: int, metrics: list[dict[str, Any]], tail: deque[str],
             failed_uri: str) -> LaunchResult:
    """The child's exit as a LaunchResult, or the error FAILED.json (or the exit code) calls for."""
    if returncode == 0:
        result_uri = storage.join(run_dir, "result.json")
        result = storage.read_json(result_uri) if storage.exists(result_uri) else None
        return LaunchResult(run_dir, returncode, metrics, result)
    # FAILED.json, else the trainer's "failed" event (a full disk may have had no room for the file)
    failure = storage.read_json(failed_uri) if storage.exists(failed_uri) else \
        next((e for e in reversed(metrics) if e.get("event") == "failed"), None)
    if failure is not None:
        if not failure.get("retryable", True):
            cls = NON_RETRYABLE.get(failure.get("reason"), PipelineError)
            raise cls(f"training in {run_dir} failed ({failure.get('reason')}): {failure.get('message')}")
    raise TrainingFailedError(f"training in {run_dir} exited with {returncode}; last output:\n"
                              + "\n".join(list(tail)[-20:]))
