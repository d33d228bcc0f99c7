"""Training on Ray Train: a real two-node Ray cluster on 127.0.0.1, CPU, gloo.

One module-scoped cluster (``ray.cluster_utils.Cluster``: a head and a second node,
one CPU each, so the two workers must land on different nodes) serves every test;
one uninterrupted 2-worker run is the reference. Without Ray installed the module
is skipped with a message, except under ``CI=true``, where a skip would hide that
the extra was not installed: there it fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.config import ModelConfig, TrainConfig
from pipeline.errors import ConfigError
from pipeline.training.launch import launch_training
from pipeline.training.ray_launch import RayCluster
from pipeline.training.train import Dist, train
from tests.test_train import child_env, corpus, epochs_of, one_thread, weights, write_inputs  # noqa: F401

try:
    from ray.cluster_utils import Cluster
except ImportError:
    if os.environ.get("CI", "").lower() == "true":  # a skip would hide that CI lacks the extra
        raise ImportError("CI=true, but Ray is missing: the Ray Train tests need pip install -e '.[ray]'") from None
    pytest.skip("needs Ray Train: pip install -e '.[ray]' (skipping the Ray Train tests)", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.requires_ray]

MODEL = {"cell": "gru", "hidden_size": 32, "embed_size": 16, "dropout": 0.0}
TRAIN = {"epochs": 3, "batch_size": 16, "sampling": "sequential", "optimizer": "sgd", "lr": 1.0,
         "clip_norm": 1.0, "checkpoint_every_steps": 40, "keep_checkpoints": 100}
TOKENS = 40_000  # 71 steps an epoch: mid-epoch checkpoints at steps 40, 80, 120, ...
PLACEMENT = re.compile(r"\[rank (\d)\] INFO pipeline\.training\.ray_launch: rank \d of 2 on node (\w+) \(pid (\d+)\)")


@pytest.fixture(scope="module")
def cluster():
    """Head + one worker node, 1 CPU each; every process they started is stopped by PID at the end."""
    # Only what the cluster starts: the session's other servers (moto, redis, postgres) are children too.
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        # GCS, raylets and the workers under them
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        c.shutdown()
        _, alive = psutil.wait_procs(started, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[str, str]:
    return write_inputs(tmp_path_factory.mktemp("ray-inputs"), MODEL, TRAIN, TOKENS)


def launch(run_dir, inputs, cluster, lines: list[str], max_failures: int = 0):
    return launch_training(str(run_dir), *inputs, nproc=2, env=child_env(), on_line=lines.append, grace_s=5,
                           ray=RayCluster(address=cluster.address, max_failures=max_failures))


def placements(lines: list[str]) -> dict[int, tuple[str, int]]:
    """rank -> (node id, pid), from the workers' first log line (the newest group's wins)."""
    return {int(m[1]): (m[2], int(m[3])) for line in lines if (m := PLACEMENT.search(line))}


@pytest.fixture(scope="module")
def ray_ref(inputs, cluster, tmp_path_factory) -> Path:
    """The uninterrupted 2-worker run on the two nodes."""
    run_dir = tmp_path_factory.mktemp("ray-ref") / "run"
    lines: list[str] = []
    result = launch(run_dir, inputs, cluster, lines)
    assert result.result["world_size"] == 2 and result.result["finished"], "\n".join(lines)
    where = placements(lines)
    assert sorted(where) == [0, 1] and where[0][0] != where[1][0], f"workers not on two nodes: {where}"
    # Metric lines reach the caller, once each, without Ray's "(RayTrainWorker pid=...)" prefix.
    assert [m["epoch"] for m in result.metrics if m.get("event") == "epoch"] == [1, 2, 3]
    return run_dir


def assert_same_weights(a_dir, b_dir):
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_two_workers_on_two_nodes_equal_one_process_with_the_full_batch(ray_ref, tmp_path):
    tr, va, vocab = corpus(TOKENS)
    train(tr, va, vocab, ModelConfig(**MODEL), TrainConfig(**TRAIN), str(tmp_path), dist_info=Dist())
    assert [e["epoch"] for e in epochs_of(ray_ref)] == [e["epoch"] for e in epochs_of(tmp_path)] == [1, 2, 3]
    assert_same_weights(ray_ref, tmp_path)


def test_a_killed_worker_is_restarted_and_the_run_resumes_exactly(inputs, cluster, ray_ref, tmp_path):
    run_dir = tmp_path / "run"
    lines: list[str] = []
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = launch(run_dir, inputs, cluster, lines, max_failures=1)
        except Exception as e:  # reported below
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    try:
        # Mid-epoch 2: the checkpoint at step 80 exists, the end of epoch 2 (step 142) is not reached yet.
        ckpts = run_dir / "checkpoints"
        deadline = time.monotonic() + 300
        while not (ckpts / "ckpt-000001-0000000080.pt").exists():
            assert thread.is_alive(), f"run ended before the checkpoint:\n{lines}"
            assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
            time.sleep(0.01)
        victim = placements(lines)[1][1]
        os.kill(victim, signal.SIGKILL)
        newest = sorted(p.name for p in ckpts.glob("ckpt-*.pt"))[-1]
        assert newest.startswith("ckpt-000001-"), f"killed too late: {newest} already written"
    finally:
        thread.join(timeout=400)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].result["finished"]
    resumed = [m for m in outcome["result"].metrics if m.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0]["epoch"] == 1, "\n".join(lines)
    assert resumed[0]["step"] in (80, 120), resumed  # a mid-epoch checkpoint: hidden states carried over
    assert [e["epoch"] for e in epochs_of(run_dir)] == [1, 2, 3]
    assert_same_weights(ray_ref, run_dir)


def test_a_bad_config_fails_once_without_ray_restarts(inputs, cluster, tmp_path):
    """A do-not-retry failure (here: a global batch that 2 workers cannot split) is not restarted by Ray."""
    config = tmp_path / "odd-batch.yaml"
    config.write_text(Path(inputs[1]).read_text().replace("batch_size: 16", "batch_size: 15"))
    lines: list[str] = []
    with pytest.raises(ConfigError, match="not divisible by the 2 ranks"):
        launch_training(str(tmp_path / "run"), inputs[0], str(config), nproc=2, env=child_env(),
                        on_line=lines.append, ray=RayCluster(address=cluster.address, max_failures=2))
    assert sum("Started training worker group" in line for line in lines) == 1, "\n".join(lines)


def test_rnnlm_run_with_the_ray_launcher_registers_a_model(cluster, tmp_path):
    from tests.test_cli import SMALL, rnnlm

    # The Ray nodes share the cores with Prefect's temporary server: give its start-up room.
    proc = rnnlm("run", *SMALL, "--launcher", "ray", "--ray-address", cluster.address, "--workers", "2", cwd=tmp_path,
                 PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    assert "registered        rnnlm-timemachine-char version 1 (champion)" in proc.stdout, proc.stdout
    (result,) = (tmp_path / ".rnnlm" / "runs").glob("*/result.json")
    assert json.loads(result.read_text())["world_size"] == 2
    logs = proc.stdout + proc.stderr  # the workers' lines, forwarded to the Prefect task's log
    assert "rank 1 of 2 on node" in logs and "epoch 1/1: train ppl" in logs, logs[-5000:]


def test_sigterm_to_the_driver_stops_the_workers_on_every_node(inputs, cluster, tmp_path):
    """Cancelling the train task (SIGTERM to the driver child) leaves no training running on the cluster."""
    from pipeline.training.launch import TrainingFailedError

    lines: list[str] = []
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = launch(tmp_path / "run", inputs, cluster, lines, max_failures=2)
        except Exception as e:  # expected: reported below
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 300
        while len(placements(lines)) < 2 or not list((tmp_path / "run").glob("checkpoints/ckpt-*.pt")):
            assert thread.is_alive(), "\n".join(lines)
            assert time.monotonic() < deadline, "timed out waiting for training to start"
            time.sleep(0.05)
        workers = [psutil.Process(pid) for _, pid in placements(lines).values()]
        (driver,) = [p for p in psutil.Process().children() if "pipeline.training.ray_launch" in p.cmdline()]
        driver.terminate()
    finally:
        thread.join(timeout=120)
    assert isinstance(outcome.get("error"), TrainingFailedError), outcome
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"Ray workers still running after the driver was stopped: {alive}"
