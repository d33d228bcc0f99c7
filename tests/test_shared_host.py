"""The trainer's OpenMP threads sleep instead of spinning when they wait (pipeline.launch)."""

from __future__ import annotations

import subprocess
import sys

from pipeline.launch import launch_training, trainer_env


def test_trainer_env_defaults_to_passive_waiting_and_respects_explicit_values(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert trainer_env()["OMP_WAIT_POLICY"] == "PASSIVE"
    assert trainer_env({"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert trainer_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_launched_trainer_gets_the_policy(tmp_path, monkeypatch):
    """The real launcher path: the child (here a shell script standing in for python) sees it."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho "policy=$OMP_WAIT_POLICY"\n')
    fake_python.chmod(0o755)
    lines: list[str] = []
    launch_training(str(tmp_path / "run"), "unused", "unused.yaml", on_line=lines.append,
                    python=str(fake_python))
    assert lines == ["policy=PASSIVE"]


def test_torch_openmp_reads_the_policy_at_load():
    """torch's bundled libgomp takes it from the environment: no spinning at barriers."""
    env = {**trainer_env(), "OMP_DISPLAY_ENV": "VERBOSE"}
    env.pop("GOMP_SPINCOUNT", None)
    out = subprocess.run([sys.executable, "-c", "import torch; torch.ones(8).sum()"], env=env,
                         capture_output=True, text=True, check=True)
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in out.stderr
    assert "GOMP_SPINCOUNT = '0'" in out.stderr
