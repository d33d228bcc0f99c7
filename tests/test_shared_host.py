"""How the trainer's OpenMP threads wait: libgomp's spinning on a free host, PASSIVE where the
trainer would oversubscribe the cores (pipeline.training.launch)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.training import launch
from pipeline.training.launch import launch_training, trainer_env, wait_policy


@pytest.fixture
def no_wait_env(monkeypatch):
    for key in launch.WAIT_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("RNNLM_NUM_THREADS", raising=False)


def test_passive_only_where_the_trainer_would_oversubscribe_the_cores():
    assert wait_policy(2, 0.0, 2) == {}  # a quiet host: spinning is fastest
    assert wait_policy(2, 0.3, 2) == {}  # beside a neighbour using 20-30% of one core: still
    assert wait_policy(2, 1.0, 2) == {"OMP_WAIT_POLICY": "PASSIVE"}  # a core already taken
    assert wait_policy(2, 2.0, 2) == {"OMP_WAIT_POLICY": "PASSIVE"}  # a second trainer
    assert wait_policy(1, 1.0, 2) == {}  # one thread beside one busy core fits


def test_trainer_env_reads_the_host_and_respects_explicit_values(no_wait_env, monkeypatch):
    cpus = launch.os.cpu_count()
    monkeypatch.setattr(launch, "busy_cpus", lambda: float(cpus))  # every core busy
    assert trainer_env()["OMP_WAIT_POLICY"] == "PASSIVE"
    assert trainer_env({"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"
    assert "OMP_WAIT_POLICY" not in trainer_env({"GOMP_SPINCOUNT": "10000"})  # the caller chose
    monkeypatch.setattr(launch, "busy_cpus", lambda: 0.0)  # an idle host
    assert "OMP_WAIT_POLICY" not in trainer_env()
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert trainer_env()["OMP_WAIT_POLICY"] == "PASSIVE"


def test_busy_cpus_sees_a_busy_process():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert launch.busy_cpus() >= 0.5
    finally:
        spinner.kill()  # by its PID: the only process this started
        spinner.wait()


def test_launched_trainer_gets_the_policy(tmp_path, no_wait_env, monkeypatch):
    """The real launcher path: the child (here a shell script standing in for python) sees it."""
    monkeypatch.setattr(launch, "busy_cpus", lambda: float(launch.os.cpu_count()))
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho "policy=$OMP_WAIT_POLICY"\n')
    fake_python.chmod(0o755)
    lines: list[str] = []
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")  # the defaults: the stand-in trainer reads nothing
    launch_training(str(tmp_path / "run"), "unused", str(config), on_line=lines.append,
                    python=str(fake_python))
    assert lines == ["policy=PASSIVE"]


def test_torch_openmp_reads_the_policy_at_load():
    """torch's bundled libgomp takes it from the environment: no spinning at barriers."""
    env = {**trainer_env({"OMP_WAIT_POLICY": "PASSIVE"}), "OMP_DISPLAY_ENV": "VERBOSE"}
    env.pop("GOMP_SPINCOUNT", None)
    out = subprocess.run([sys.executable, "-c", "import torch; torch.ones(8).sum()"], env=env,
                         capture_output=True, text=True, check=True)
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in out.stderr
    assert "GOMP_SPINCOUNT = '0'" in out.stderr
