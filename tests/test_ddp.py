"""The trainer under torchrun: DDP equals one big process, resume after a killed rank, two nodes.

Real torchrun (gloo on 127.0.0.1), tiny GRU, ~1 s epochs. One 2-rank reference
run is shared by the tests of this module.
"""

from __future__ import annotations

import shutil
import socket
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from pipeline.training.checkpoint import list_checkpoints, load_checkpoint
from pipeline.config import ModelConfig, TrainConfig
from pipeline.training.launch import launch_training
from pipeline.training.distributed import Dist
from pipeline.training.train import train
from tests.test_train import (child_env, corpus, epochs_of, kill_after_checkpoint, one_thread,  # noqa: F401
                              weights, write_inputs)

MODEL = {"cell": "gru", "hidden_size": 32, "embed_size": 16, "dropout": 0.0}
TRAIN = {"epochs": 3, "batch_size": 16, "sampling": "sequential", "optimizer": "sgd", "lr": 1.0,
         "clip_norm": 1.0, "checkpoint_every_steps": 50, "keep_checkpoints": 100}
TOKENS = 60_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[str, str]:
    return write_inputs(tmp_path_factory.mktemp("ddp-inputs"), MODEL, TRAIN, TOKENS)


@pytest.fixture(scope="module")
def ref2(inputs, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run, through the launcher (torchrun --standalone)."""
    run_dir = tmp_path_factory.mktemp("ddp-ref") / "run"
    lines: list[str] = []
    result = launch_training(str(run_dir), *inputs, nproc=2, env=child_env(), on_line=lines.append)
    assert result.result["world_size"] == 2 and result.result["epochs"] == TRAIN["epochs"]
    assert [m["epoch"] for m in result.metrics if m.get("event") == "epoch"] == [1, 2, 3]
    assert any("[rank 0]" in line and "starting fresh" in line for line in lines)  # logs were streamed
    return run_dir


def assert_close_weights(a_dir, b_dir, *, rtol, atol):
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def test_two_ranks_equal_one_process_with_twice_the_batch(ref2, tmp_path):
    tr, va, vocab = corpus(TOKENS)
    train(tr, va, vocab, ModelConfig(**MODEL), TrainConfig(**TRAIN), str(tmp_path), dist_info=Dist())
    ddp, single = epochs_of(ref2), epochs_of(tmp_path)
    assert [e["epoch"] for e in ddp] == [e["epoch"] for e in single] == [1, 2, 3]
    for a, b in zip(ddp, single):
        assert a["train_ppl"] == pytest.approx(b["train_ppl"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert_close_weights(ref2, tmp_path, rtol=1e-4, atol=1e-5)


def test_mid_epoch_checkpoint_resumes_on_another_world_size(ref2, tmp_path):
    """A 2-rank mid-epoch checkpoint holds both ranks' streams: one process can carry on exactly."""
    mid = [u for u in list_checkpoints(str(ref2 / "checkpoints")) if load_checkpoint(u)["hidden"] is not None]
    mid = [u for u in mid if Path(u).name.startswith("ckpt-000001-")][0]
    ckpt = load_checkpoint(mid)
    assert ckpt["world_size"] == 2 and ckpt["hidden"][0].shape[1] == TRAIN["batch_size"]
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(mid, tmp_path / "checkpoints")
    tr, va, vocab = corpus(TOKENS)
    train(tr, va, vocab, ModelConfig(**MODEL), TrainConfig(**TRAIN), str(tmp_path), dist_info=Dist())
    assert_close_weights(ref2, tmp_path, rtol=1e-4, atol=1e-5)


def _rank1(proc) -> int:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == "1":
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError("no rank-1 worker found")


def test_kill_one_rank_and_resume(inputs, ref2, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--max-restarts=0", "-m", "pipeline.training.train", "--run-dir", str(run_dir),
           "--dataset", inputs[0], "--config", inputs[1]]
    kill_after_checkpoint(cmd, run_dir, epoch=1, victim=_rank1)
    assert not (run_dir / "model.pt").exists()

    lines: list[str] = []
    launch_training(str(run_dir), *inputs, nproc=2, env=child_env(), on_line=lines.append)
    assert any("resuming from epoch 1 step" in line for line in lines), "\n".join(lines)
    assert [e["epoch"] for e in epochs_of(run_dir)] == [1, 2, 3]
    assert_close_weights(ref2, run_dir, rtol=1e-6, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_match_one_node(inputs, ref2, tmp_path):
    run_dir = tmp_path / "run"  # shared storage: both "nodes" see one run directory
    endpoint = f"127.0.0.1:{_free_port()}"
    outcomes: dict[int, object] = {}

    def node(rank: int) -> None:
        try:
            outcomes[rank] = launch_training(
                str(run_dir), *inputs, nproc=1, nnodes=2, node_rank=rank, rdzv_endpoint=endpoint,
                rdzv_id=f"test-{endpoint}", env=child_env(), grace_s=5)
        except Exception as e:  # reported below
            outcomes[rank] = e

    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(not isinstance(o, Exception) for o in outcomes.values()), outcomes
    assert len(outcomes) == 2
    assert outcomes[0].result["world_size"] == 2
    assert_close_weights(ref2, run_dir, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nccl_on_cuda(inputs, tmp_path):
    """NCCL DDP on the local GPUs (2 ranks if there are 2 GPUs, else 1) trains and agrees with itself."""
    nproc = min(2, torch.cuda.device_count())
    raw = yaml.safe_load(Path(inputs[1]).read_text())
    raw["train"].update(device="cuda", epochs=2)
    config = tmp_path / "cuda.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = launch_training(str(tmp_path / "run"), inputs[0], str(config), nproc=nproc, env=child_env())
    assert result.result["device"] != "cpu"  # the GPU's name
    assert result.result["world_size"] == nproc
    assert all(m["val_ppl"] < 27 for m in result.metrics if m.get("event") == "epoch")
    w = weights(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in w.values())


def test_budgets_stop_two_ranks_mid_epoch_and_resume_bit_exact(inputs, ref2, tmp_path):
    """max_minutes (spent by the first step), then max_steps (mid-epoch, between periodic
    checkpoints), then no budget: two ranks end with the uninterrupted run's weights, bit for bit."""
    run_dir = tmp_path / "run"
    for budget, steps in (({"max_minutes": 1e-6}, 1), ({"max_steps": 70}, 70), ({}, None)):
        config = tmp_path / "budget.yaml"
        config.write_text(yaml.safe_dump({"model": MODEL, "train": {**TRAIN, **budget}}))
        result = launch_training(str(run_dir), inputs[0], str(config), nproc=2, env=child_env()).result
        if steps is not None:
            assert result["steps"] == steps and not result["finished"], result
            assert epochs_of(run_dir)[-1]["event"] == "eval" and epochs_of(run_dir)[-1]["step"] == steps
    assert result["finished"] and result["world_size"] == 2
    a, b = weights(ref2), weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["step"] for e in epochs_of(run_dir)] == [1, 70] + [e["step"] for e in epochs_of(ref2)]
