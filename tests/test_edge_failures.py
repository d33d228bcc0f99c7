"""Failures where the pipeline meets other systems and optional pieces: each ends in one
``rnnlm: error:`` line naming the input, with the exit code that tells a scheduler whether to
retry, and leaves nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# `rnnlm ARGS...` with the modules named in argv[1] (comma-separated) made unimportable:
# a default install without an extra.
CLI = ("import sys\n"
       "for m in filter(None, sys.argv[1].split(',')):\n"
       "    sys.modules[m] = None\n"
       "from flows.cli import main\n"
       "sys.exit(main(sys.argv[2:]))")
TINY = ["--set", "data.splits.max_tokens=3000", "--set", "model.hidden_size=8", "--set", "model.embed_size=8",
        "--set", "train.epochs=1", "--set", "train.max_minutes=null"]


def env(**extra) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RNNLM_STORAGE", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PYTHONPATH")}
    e.update(RNNLM_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return e


def rnnlm(*args: str, cwd: Path, hide: tuple[str, ...] = (), timeout: float = 600,
          **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, ",".join(hide), *args], cwd=cwd, env=env(**extra),
                          capture_output=True, text=True, timeout=timeout)


def verdict(proc: subprocess.CompletedProcess) -> str:
    """The last line on stderr, which must be the one-line verdict (no traceback anywhere)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rnnlm: error: "), proc.stderr[-4000:]
    return last


# ------------------------------------------------------------------------ optional extras


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_an_s3_root_without_the_s3_extra_names_the_extra(tmp_path, command):
    proc = rnnlm(command, "--root", "s3://bucket/x", *TINY, cwd=tmp_path, hide=("s3fs",))
    last = verdict(proc)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "s3://bucket/x" in last and "pip install 'rnnlm[s3]'" in last, last
    assert not (tmp_path / ".rnnlm").exists()


# ------------------------------------------------------------------ configs checked early


def test_adaptive_cutoffs_beyond_the_vocabulary_fail_before_training(tmp_path):
    proc = rnnlm("train", "--root", str(tmp_path / "store"), *TINY, "--set", "model.softmax=adaptive",
                 "--set", "model.adaptive_cutoffs=[10, 40]", cwd=tmp_path)
    last = verdict(proc)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "adaptive_cutoffs [10, 40]" in last and "vocabulary size 28" in last, last
    assert "launching" not in proc.stderr  # no trainer was started
    runs = tmp_path / "store" / "runs"
    assert not runs.exists() or not list(runs.rglob("checkpoints/*"))


def test_a_tampered_pinned_vocabulary_without_sha256_is_a_corrupt_vocabulary(tmp_path):
    from pipeline.config import DataConfig, SplitConfig
    from pipeline.data.prepare import prepare_dataset

    store = tmp_path / "store"
    first = prepare_dataset(DataConfig(splits=SplitConfig(max_tokens=3000)), str(store))
    data = bytearray((Path(first.uri) / "vocab.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the Parquet footer's metadata
    pinned = tmp_path / "vocab.parquet"
    pinned.write_bytes(bytes(data))
    before = sorted(p.name for p in (store / "datasets").iterdir())

    proc = rnnlm("prepare", "--root", str(store), *TINY, "--set", f"data.vocab.pinned={pinned}", cwd=tmp_path)
    last = verdict(proc)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"corrupt vocabulary {pinned}" in last, last
    assert sorted(p.name for p in (store / "datasets").iterdir()) == before  # nothing half-written


# ------------------------------------------------------------------ object stores


@pytest.fixture(scope="module")
def s3_auth_server(tmp_path_factory):
    """moto's S3 API checking credentials (IAM auth on from the first request): any key is unknown."""
    from tests.servers import Processes, S3Server, clean_env, free_port, require, wait_http

    require("moto", "s3fs")
    procs = Processes(tmp_path_factory.mktemp("s3-auth-server"))
    try:
        port = free_port()
        proc = procs.start("moto-auth", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                           env=clean_env(INITIAL_NO_AUTH_ACTION_COUNT="0"))
        wait_http(f"http://127.0.0.1:{port}/moto-api/", proc, procs, "moto-auth")
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        procs.stop_all()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["prepare", "train"])
def test_an_unreachable_object_store_is_one_retryable_line_naming_root_and_endpoint(tmp_path, s3_server, command):
    bucket = s3_server.new_bucket()
    root, nowhere = bucket + "/x", "http://127.0.0.1:1"
    proc = rnnlm(command, "--root", root, *TINY, cwd=tmp_path, timeout=300,
                 **{**s3_server.env, "AWS_ENDPOINT_URL_S3": nowhere, "AWS_MAX_ATTEMPTS": "2"})
    last = verdict(proc)
    assert proc.returncode == 1, proc.stderr[-3000:]  # retryable
    assert f"artifact store '{root}" in last and f"cannot be reached at {nowhere}" in last, last
    assert "retrying later may help" in last and "AWS_MAX_ATTEMPTS" in last, last
    assert not (tmp_path / ".rnnlm").exists()
    assert _keys(s3_server, bucket) == []  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("command", ["prepare", "train"])
def test_bad_object_store_credentials_are_one_line_not_retried(tmp_path, s3_auth_server, command):
    root = "s3://rnnlm-creds/x"
    proc = rnnlm(command, "--root", root, *TINY, cwd=tmp_path, timeout=300, **s3_auth_server.env)
    last = verdict(proc)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"artifact store '{root}" in last and f"refused at {s3_auth_server.endpoint}" in last, last
    assert ("InvalidAccessKeyId" in last or "403" in last) and "check the credentials" in last, last
    assert not (tmp_path / ".rnnlm").exists()


def _keys(s3_server, bucket: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket[len("s3://"):]).get("Contents", [])]


@pytest.mark.slow
def test_run_on_an_s3_root_without_the_s3_extra_is_not_retried(tmp_path):
    proc = rnnlm("run", "--root", "s3://bucket/x", *TINY, cwd=tmp_path, hide=("s3fs",),
                 MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    last = verdict(proc)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "pip install 'rnnlm[s3]'" in last and "retrying may help" not in last, last
    assert "Retry 1" not in proc.stderr


@pytest.mark.slow
def test_run_on_an_unreachable_object_store_is_one_retryable_line(tmp_path, s3_server):
    bucket = s3_server.new_bucket()
    root, nowhere = bucket + "/x", "http://127.0.0.1:1"
    proc = rnnlm("run", "--root", root, *TINY, cwd=tmp_path, timeout=600,
                 **{**s3_server.env, "AWS_ENDPOINT_URL_S3": nowhere, "AWS_MAX_ATTEMPTS": "2",
                    "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    last = verdict(proc)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"artifact store '{root}" in last and f"cannot be reached at {nowhere}" in last, last
    assert _keys(s3_server, bucket) == []
