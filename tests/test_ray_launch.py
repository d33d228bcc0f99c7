"""The Ray launcher's pieces that need no Ray: importing without it, output lines, up-front checks.

The launcher itself, on a real two-node Ray cluster, is tested in test_ray.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.training.ray_launch import RayCluster, check_capacity, check_devices, worker_line


def test_pipeline_imports_and_reports_a_clear_error_without_ray(tmp_path):
    """`import ray` fails in the child: the launch modules still import, the driver names the extra."""
    config = tmp_path / "run.yaml"
    config.write_text("train: {epochs: 1}\n")
    code = ("import sys; sys.modules['ray'] = None\n"
            "import pipeline.training.launch, pipeline.training.train, tasks.train\n"
            "from pipeline.training.ray_launch import main\n"
            f"sys.exit(main(['--workers', '2', '--run-dir', {str(tmp_path / 'run')!r}, '--dataset', 'x.npz', "
            f"'--config', {str(config)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr  # do not retry
    assert "pip install 'rnnlm[ray]'" in proc.stderr
    assert "rnnlm[ray]" in (tmp_path / "run" / "FAILED.json").read_text()


def test_worker_lines_lose_rays_prefix_and_nothing_else():
    assert worker_line('(RayTrainWorker pid=4242, ip=10.0.0.7) {"event": "epoch"}') == '{"event": "epoch"}'
    assert worker_line("(RayTrainWorker pid=17) 2026-11-24 [rank 1] INFO x") == "2026-11-24 [rank 1] INFO x"
    assert worker_line("(pid=17) text") == "text"
    assert worker_line("plain driver line (pid=1) ") == "plain driver line (pid=1) "


def test_devices_and_gpus_must_agree():
    check_devices("auto", RayCluster(gpus_per_worker=1))
    with pytest.raises(ConfigError, match="--gpus-per-worker"):
        check_devices("cuda", RayCluster())
    with pytest.raises(ConfigError, match="NCCL"):
        check_devices("cpu", RayCluster(gpus_per_worker=1))
    with pytest.raises(ConfigError, match="address"):
        RayCluster(address="")


def test_too_few_resources_fail_on_a_fixed_machine_and_warn_on_a_cluster(caplog):
    check_capacity({"CPU": 2.0}, {"CPU": 1}, 2, grows=False)
    with pytest.raises(ConfigError, match=r"3 Ray workers .*CPU: 3 needed, 2 in the cluster"):
        check_capacity({"CPU": 2.0}, {"CPU": 1}, 3, grows=False)
    check_capacity({"CPU": 64.0}, {"CPU": 1, "GPU": 1}, 4, grows=True)
    assert "GPU: 4 needed, 0 in the cluster" in caplog.text


def test_no_ray_cluster_is_a_config_error_naming_the_ways_out(tmp_path):
    """`--launcher ray` with the default address `auto` and no cluster running: exit 3 (never
    retried), one line saying to start a cluster or pass `--ray-address local`."""
    pytest.importorskip("ray.train")
    from ray._private.services import find_gcs_addresses

    if find_gcs_addresses():
        pytest.skip("a Ray cluster is running on this machine: `auto` would find it")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([str(Path(sys.executable).with_name("rnnlm")), "train", "--launcher", "ray", "--workers", "2",
                           "--root", str(tmp_path / "store"), "--set", "data.splits.max_tokens=3000",
                           "--set", "model.hidden_size=8", "--set", "train.epochs=1"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert last.startswith("rnnlm: error: ") and "no running Ray cluster" in last, last
    assert "ray start --head" in last and "--ray-address local" in last, last
    assert not list((tmp_path / "store" / "runs").glob("*/checkpoints/*"))


@pytest.mark.slow
def test_no_ray_cluster_under_run_is_not_retried(tmp_path):
    pytest.importorskip("ray.train")
    from ray._private.services import find_gcs_addresses

    if find_gcs_addresses():
        pytest.skip("a Ray cluster is running on this machine: `auto` would find it")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RNNLM_STORAGE", "PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([str(Path(sys.executable).with_name("rnnlm")), "run", "--launcher", "ray", "--workers", "2",
                           "--set", "data.splits.max_tokens=3000", "--set", "model.hidden_size=8", "--set",
                           "train.epochs=1"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert last.startswith("rnnlm: error: ") and "--ray-address local" in last, last
    assert "not retrying (retrying cannot fix this)" in proc.stderr
    log = Path(last.rsplit("(full log: ", 1)[1].rstrip(")")).read_text()
    assert log.count("Retrying") == 0 and log.count("launching:") == 1, log[-3000:]  # one attempt
