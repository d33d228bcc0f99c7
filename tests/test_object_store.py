"""The pipeline on an S3 API: moto's server on 127.0.0.1 (tests/servers.py), reached through s3fs.

Publishing a directory is data first, manifest last, and a publish killed halfway is completed
by the next one; store errors that retrying cannot fix are not retried; the whole ``rnnlm run``
keeps every artifact (corpus copies, datasets, checkpoints, metrics, Prefect results) on S3.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.config import DataConfig, SplitConfig
from pipeline.errors import StorageError
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import MANIFEST, open_dataset

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = DataConfig(splits=SplitConfig(max_tokens=6000), tokens_per_shard=1000)


def s3_keys(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    return sorted(p[len(path) + 1:] for p in fs.find(path))


def test_dataset_written_to_s3_reads_back_verified(s3_root):
    ds = prepare_dataset(TINY_DATA, s3_root)
    assert ds.uri.startswith(s3_root + "/datasets/")
    keys = s3_keys(ds.uri)
    assert MANIFEST in keys and "vocab.parquet" in keys and len([k for k in keys if k.startswith("train-")]) >= 4
    assert not [k for k in s3_keys(s3_root) if ".tmp-" in k]  # no staging leftovers
    again = open_dataset(ds.uri)
    assert sum(len(again.split(s)) for s in ("train", "val", "test")) == 6000
    assert prepare_dataset(TINY_DATA, s3_root).uri == ds.uri  # found complete: not rewritten


KILLED_PUBLISH = textwrap.dedent("""
    import os, signal, sys
    import s3fs
    from pipeline.config import DataConfig, SplitConfig
    from pipeline.data.prepare import prepare_dataset

    copies = 0
    real_copy = s3fs.S3FileSystem.copy

    def copy(self, src, dst, **kw):  # the publish dies (SIGKILL) after its third file
        global copies
        if "/datasets/" in dst and ".tmp-" not in dst:
            copies += 1
            if copies > 3:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_copy(self, src, dst, **kw)

    s3fs.S3FileSystem.copy = copy
    prepare_dataset(DataConfig(splits=SplitConfig(max_tokens=6000), tokens_per_shard=1000), sys.argv[1])
""")


def test_a_publish_killed_halfway_is_completed_by_the_next_run(s3_root):
    killed = subprocess.run([sys.executable, "-c", KILLED_PUBLISH, s3_root], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    (dataset_dir,) = [k.split("/")[1] for k in s3_keys(s3_root) if k.startswith("datasets/") and ".tmp-" not in k][:1]
    partial = s3_root + "/datasets/" + dataset_dir
    assert MANIFEST not in s3_keys(partial) and s3_keys(partial)  # data landed, the marker did not

    ds = prepare_dataset(TINY_DATA, s3_root)  # the next run: same content address, repaired
    assert ds.uri == partial and MANIFEST in s3_keys(partial)
    assert sum(len(ds.split(s)) for s in ("train", "val", "test")) == 6000  # every shard verified


def test_publish_puts_the_manifest_last(s3_root):
    staging = s3_root + "/x.tmp-1"
    for name in ("a.bin", "b.bin", MANIFEST, "z.bin"):
        storage.write_bytes_atomic(f"{staging}/{name}", name.encode() * 100)
    fs, _ = storage.filesystem(s3_root)
    order = []
    real_copy = fs.copy
    fs.copy = lambda src, dst, **kw: (order.append(dst.rsplit("/", 1)[-1]), real_copy(src, dst, **kw))
    try:
        assert storage.publish_dir(staging, s3_root + "/x")
    finally:
        del fs.copy
    assert order[-1] == MANIFEST and sorted(order) == sorted(["a.bin", "b.bin", MANIFEST, "z.bin"])
    assert s3_keys(s3_root + "/x") == sorted(order) and not storage.exists(staging)
    # published already: a second publish of the same content keeps the first
    storage.write_bytes_atomic(f"{staging}/{MANIFEST}", b"{}")
    assert storage.publish_dir(staging, s3_root + "/x") is False and not storage.exists(staging)


def test_a_file_written_by_another_process_is_seen_at_once(s3_root):
    """No listing cache: a worker must see what another host (or its trainer child) wrote."""
    storage.write_bytes_atomic(s3_root + "/runs/r/seen.json", b"{}")
    fs, path = storage.filesystem(s3_root)
    assert fs.ls(path + "/runs/r", detail=False) == [path + "/runs/r/seen.json"]  # a listing, once cached
    subprocess.run([sys.executable, "-c", "import sys; from pipeline import storage; "
                    "storage.write_bytes_atomic(sys.argv[1], b'1')", s3_root + "/runs/r/result.json"],
                   cwd=REPO, check=True, timeout=120)
    assert storage.exists(s3_root + "/runs/r/result.json")


def test_an_invalid_bucket_fails_at_once_and_is_not_retried(s3_server, monkeypatch):
    from pipeline.data.corpus import fetch_corpus
    from tasks.retries import is_retryable

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StorageError) as raised:
        fetch_corpus(DataConfig().sources, "s3://ab/store")  # too short to be a bucket name
    assert "s3://ab/store/corpus" in str(raised.value) and "not valid" in str(raised.value)
    assert not raised.value.retryable and not is_retryable(raised.value)


def test_permanent_s3_errors_are_told_from_passing_ones(s3_server):
    import errno

    from botocore.exceptions import ClientError

    def client_error(code):
        err = OSError(errno.EIO, code)
        err.__cause__ = ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")
        return err

    assert storage.is_permanent_error(client_error("AccessDenied"))
    assert storage.is_permanent_error(client_error("NoSuchBucket"))
    assert not storage.is_permanent_error(client_error("SlowDown"))
    assert not storage.is_permanent_error(ConnectionResetError())


@pytest.mark.slow
def test_a_trainer_killed_mid_run_resumes_from_its_s3_checkpoint(tmp_path, s3_root):
    import signal
    import time

    import torch

    from pipeline.training.checkpoint import list_checkpoints
    from pipeline.training.metrics import read_epochs
    from tests.test_train import TINY, child_env, trainer_cmd, write_inputs

    dataset, config = write_inputs(tmp_path, {**TINY, "dropout": 0.2},
                                   {"epochs": 3, "optimizer": "sgd", "lr": 1.0, "momentum": 0.5}, 100_000)
    ref = tmp_path / "ref"  # the same run uninterrupted, on local disk
    subprocess.run(trainer_cmd(ref, dataset, config), env=child_env(), cwd=REPO, check=True, capture_output=True,
                   timeout=300)

    run = s3_root + "/runs/killed"
    proc = subprocess.Popen(trainer_cmd(run, dataset, config), env=child_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list_checkpoints(run + "/checkpoints"):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint on S3 before the run ended"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    newest = list_checkpoints(run + "/checkpoints")[-1].rsplit("/", 1)[-1]
    assert newest.startswith("ckpt-000001-") and not storage.exists(run + "/model.pt"), "killed too late"

    again = subprocess.run(trainer_cmd(run, dataset, config), env=child_env(), cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from epoch 1" in again.stderr and "s3://" in again.stderr, again.stderr[-3000:]
    a = torch.load(ref / "model.pt", weights_only=True)
    b = torch.load(io.BytesIO(storage.read_bytes(run + "/model.pt")), weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if never killed
    assert [e["epoch"] for e in read_epochs(run)] == [1, 2, 3]  # metrics.jsonl on S3, truncated on resume
