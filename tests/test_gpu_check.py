"""bench/gpu_check.sh, the GPU path's one command, in its CPU smoke mode (what CI can run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEYS = {"gpu_tests", "trainer_ratio_min", "graphs_ratio_min", "waits_per_step", "adaptive_speedup",
        "adaptive_speedup_50k", "adaptive_speedup_250k", "ptb_medium_test_ppl", "ptb_medium_tied_test_ppl"}


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
