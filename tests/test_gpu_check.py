"""bench/gpu_check.sh, the GPU path's one command, in its CPU smoke mode (what CI can run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import adaptive_from

REPO = Path(__file__).resolve().parents[1]
KEYS = {"gpu_tests", "trainer_ratio_min", "graphs_ratio_min", "waits_per_step", "adaptive_speedup",
        "adaptive_speedup_50k", "adaptive_speedup_250k", "adaptive_from", "ptb_medium_test_ppl",
        "ptb_medium_tied_test_ppl"}


@pytest.mark.slow
def test_the_cpu_smoke_run_writes_its_reports_and_one_json_line(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(summary)
    assert summary["gpu_tests"]["failed"] == 0 and summary["gpu_tests"]["skipped"] >= 1  # they import without CUDA
    assert summary["trainer_ratio_min"] > 0
    assert summary["ptb_medium_test_ppl"] is None  # no --ptb-dir
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"preflight", "gpu_tests", "trainer", "graphs", "syncs", "softmax"} <= set(report["parts"])
    # Without CUDA the graphs and syncs parts say so instead of failing.
    assert report["parts"]["graphs"]["status"] == report["parts"]["syncs"]["status"] == "skipped (needs CUDA)"
    assert summary["graphs_ratio_min"] is None and summary["waits_per_step"] == {"eager": None, "graphs": None}
    assert "| trainer | ok |" in (tmp_path / "gpu_check.md").read_text()


def test_a_missing_package_is_named_in_one_line(tmp_path):
    code = ("import importlib.util, runpy, sys\n"
            "real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda name, *a: None if name == 'pydantic' else real(name, *a)\n"
            f"sys.argv = ['gpu_check.py', '--device', 'cpu', '--out', {str(tmp_path)!r}]\n"
            "runpy.run_path('bench/gpu_check.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: missing Python packages: pydantic (install them, or carry wheels: see bench/gpu_check.sh)"]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["gpu_tests"] is None


def test_a_part_the_budget_leaves_out_is_reported_and_fails_the_check(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--parts", "trainer,softmax",
                           "--budget-min", "0.001", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert {k: p["status"] for k, p in parts.items()} == {
        "preflight": "ok", "trainer": "skipped (budget)", "softmax": "skipped (budget)"}  # only the parts asked for
    assert json.loads(proc.stdout.strip().splitlines()[-1])["trainer_ratio_min"] is None


def test_an_unknown_part_is_named(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--parts", "trainer,graph",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--parts: unknown graph (choose from gpu_tests, trainer, graphs, softmax, syncs, ptb)" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_adaptive_from_is_where_the_adaptive_head_wins_from_there_on():
    assert adaptive_from({10_000: 0.66, 50_000: 0.64, 100_000: 1.05, 150_000: 1.1, 250_000: 1.21}) == 100_000
    assert adaptive_from({50_000: 1.1, 100_000: 0.9, 250_000: 1.3}) == 250_000  # not 50k: it loses at 100k
    assert adaptive_from({10_000: 0.66, 250_000: 0.97}) is None
    assert adaptive_from({}) is None


def test_wheels_that_are_not_there_are_named_before_anything_runs(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--wheels", str(tmp_path / "none"), "--device", "cpu",
                           "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"gpu_check: --wheels {tmp_path / 'none'}: no .whl files there"
    assert not (tmp_path / "out").exists()
