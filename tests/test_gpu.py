"""The CUDA path (``-m gpu``; skipped without CUDA). Never run here yet: no GPU has been lent.

Tolerances, and why:

* NCCL DDP vs one process: every weight within rtol 1e-3 / atol 1e-4 after one epoch. The two
  runs add the same gradients in a different order (an all-reduce of two halves vs one
  full-batch backward) and cuDNN picks kernels per batch shape, so they agree to float
  rounding, amplified a little by training; not bit for bit as on CPU/gloo.
* Validation sharded over NCCL ranks vs one process: rel 1e-5 (per-stream float64 sums,
  rounding only in the per-token fp32 cross-entropies).
* Resume on GPU, dropout 0: weights within 1e-5 of the uninterrupted run (TF32 off, cuDNN
  deterministic). With dropout between cuDNN layers it is not exact: cuDNN keeps its dropout
  RNG state in a per-device descriptor that torch seeds once per process, so a resumed process
  draws different masks from the uninterrupted one; that run is only checked to train on.
* bf16 / fp16 vs fp32: best validation perplexity within 1%.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ModelConfig, TrainConfig
from pipeline.model.evaluate import perplexity
from pipeline.model.models import build_model
from pipeline.training.train import train
from tests.test_train import (REPO, check_divergence_names_its_step, child_env, corpus, epochs_of,  # noqa: F401
                              weights, write_inputs)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: 2 GPUs")

MODEL = {"cell": "lstm", "hidden_size": 256, "num_layers": 2, "embed_size": 64, "dropout": 0.0}
TRAIN = {"epochs": 1, "batch_size": 32, "num_steps": 35, "optimizer": "sgd", "lr": 1.0, "clip_norm": 1.0,
         "device": "cuda"}


def quality_run(tmp_path: Path, precision: str) -> float:
    """d2l's char GRU on 100k characters, 8 epochs of Adam: the best validation perplexity."""
    tr, va, vocab = corpus(100_000)
    result = train(tr, va, vocab, ModelConfig(cell="gru", hidden_size=256, embed_size=64),
                   TrainConfig(epochs=8, batch_size=32, num_steps=35, optimizer="adam", lr=0.004, seed=0,
                               device="cuda", precision=precision), str(tmp_path / precision))
    return result["val_ppl"]


@two_gpus
def test_nccl_ddp_equals_one_process(tmp_path):
    from pipeline.training.launch import launch_training

    dataset, config = write_inputs(tmp_path / "in", MODEL, {**TRAIN, "tf32": False}, 60_000)
    env = {**child_env(), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    one = launch_training(str(tmp_path / "one"), dataset, config, nproc=1, env=env)
    two = launch_training(str(tmp_path / "two"), dataset, config, nproc=2, env=env)
    assert two.result["world_size"] == 2 and one.result["device"] == two.result["device"] != "cpu"
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    # Validation sharded over the two ranks scores what one process does.
    assert two.result["val_ppl"] == pytest.approx(one.result["val_ppl"], rel=1e-3)


@two_gpus
def test_sharded_validation_on_nccl_equals_one_process(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(
        "import os, sys, torch, torch.distributed as dist\n"
        "from pipeline.config import ModelConfig\nfrom pipeline.model.models import build_model\n"
        "from pipeline.model.evaluate import perplexity\nfrom tests.test_train import corpus\n"
        "rank = int(os.environ['RANK']); torch.cuda.set_device(rank)\n"
        "dist.init_process_group('nccl', device_id=torch.device('cuda', rank))\n"
        "torch.manual_seed(0)\n"
        "m = build_model(ModelConfig(cell='lstm', hidden_size=64, init='uniform', init_scale=0.3), 28).cuda()\n"
        "_, va, _ = corpus(1000, 5003)\n"
        "ppl = perplexity(m, va, batch_size=32, device='cuda', rank=rank, world_size=2)\n"
        "if rank == 0: print('PPL', repr(ppl), repr(perplexity(m, va, batch_size=32, device='cuda')))\n"
        "dist.destroy_process_group()\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script)], env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    sharded, single = (float(x) for x in out.stdout.split("PPL")[1].split())
    assert sharded == pytest.approx(single, rel=1e-5)


def test_resume_on_gpu(tmp_path, monkeypatch):
    """Two epochs in one go vs one epoch, then a second process resuming for the second."""
    tr, va, vocab = corpus(40_000)
    model_cfg = ModelConfig(**MODEL)
    cfg = TrainConfig(**{**TRAIN, "epochs": 2, "tf32": False})
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    train(tr, va, vocab, model_cfg, cfg, str(tmp_path / "ref"))
    train(tr, va, vocab, model_cfg, TrainConfig(**{**cfg.model_dump(), "epochs": 1}), str(tmp_path / "run"))
    train(tr, va, vocab, model_cfg, cfg, str(tmp_path / "run"))  # resumes from the epoch-1 checkpoint
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "run")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)
    # With cuDNN dropout between layers the masks differ after a resume: it still trains.
    dropout_cfg = ModelConfig(**{**MODEL, "dropout": 0.3})
    train(tr, va, vocab, dropout_cfg, TrainConfig(**{**cfg.model_dump(), "epochs": 1}), str(tmp_path / "d"))
    result = train(tr, va, vocab, dropout_cfg, cfg, str(tmp_path / "d"))
    assert result["epochs"] == 2 and result["val_ppl"] < 20


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_reaches_fp32_perplexity(tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    fp32 = quality_run(tmp_path, "fp32")
    assert quality_run(tmp_path, precision) == pytest.approx(fp32, rel=0.01)


def test_adaptive_softmax_trains_on_gpu(tmp_path):
    """Word level with a synthetic Zipf vocabulary of 20k: it learns, and GPU and CPU agree."""
    import numpy as np

    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, 20_001)
    ids = rng.choice(20_000, size=200_000, p=p / p.sum()).astype(np.int32)
    ids[1::2] = (ids[::2] + 1) % 20_000  # a learnable pattern: every other token follows its predecessor
    model_cfg = ModelConfig(cell="lstm", hidden_size=256, embed_size=256, softmax="adaptive",
                            adaptive_cutoffs=(2_000, 10_000))
    cfg = TrainConfig(epochs=3, batch_size=32, num_steps=35, optimizer="adam", lr=0.002, device="cuda")
    train(ids[:180_000], ids[180_000:], 20_000, model_cfg, cfg, str(tmp_path / "run"))
    epochs = epochs_of(tmp_path / "run")
    assert epochs[-1]["val_ppl"] < epochs[0]["val_ppl"]
    model = build_model(model_cfg, 20_000)
    model.load_state_dict(weights(tmp_path / "run"))
    on_cpu = perplexity(model, ids[180_000:], batch_size=32)
    on_gpu = perplexity(model.cuda(), ids[180_000:], batch_size=32)
    assert on_gpu == pytest.approx(on_cpu, rel=1e-4)


def test_tf32_is_on_by_default_on_cuda(tmp_path):
    tr, va, vocab = corpus(20_000)
    train(tr, va, vocab, ModelConfig(cell="gru", hidden_size=32), TrainConfig(epochs=1, device="cuda"),
          str(tmp_path / "run"))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_lagging_non_finite_check_names_the_step_and_keeps_good_checkpoints(tmp_path, monkeypatch):
    """The GPU reads each step's flag a few steps late: it still names the step that diverged and
    no checkpoint holds bad weights (a gradient made NaN at step 28, checkpoints every 1 and 10)."""
    check_divergence_names_its_step(tmp_path, monkeypatch, "cuda", deferred=True)


# ----------------------------------------------------------------- train.cuda_graphs


def graphed_and_eager(tmp_path, model: dict, train_cfg: dict, tokens: int = 40_000):
    """The same run eagerly and with cuda_graphs (TF32 off, cuDNN deterministic); the graphed
    run's captures are counted."""
    from pipeline.training import cuda_graph

    tr, va, vocab = corpus(tokens)
    captures = []
    real = cuda_graph.GraphedStep._capture

    def counted(self):
        captures.append(self.lrs)
        real(self)
    torch.backends.cudnn.deterministic = True
    try:
        cuda_graph.GraphedStep._capture = counted
        cfg = {**TRAIN, **train_cfg, "tf32": False}
        eager = train(tr, va, vocab, ModelConfig(**model), TrainConfig(**cfg), str(tmp_path / "eager"))
        graphed = train(tr, va, vocab, ModelConfig(**model), TrainConfig(**cfg, cuda_graphs=True),
                        str(tmp_path / "graphed"))
    finally:
        cuda_graph.GraphedStep._capture = real
        torch.backends.cudnn.deterministic = False
    return eager, graphed, captures


def assert_same_training(tmp_path, rtol=1e-5, atol=1e-5):
    """Weights and every metrics line's losses agree (the tolerance: float rounding only)."""
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "graphed")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)
    for x, y in zip(epochs_of(tmp_path / "eager"), epochs_of(tmp_path / "graphed"), strict=True):
        assert x["train_ppl"] == pytest.approx(y["train_ppl"], rel=rtol)
        assert x["val_ppl"] == pytest.approx(y["val_ppl"], rel=rtol)


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_cuda_graphs_train_what_the_eager_step_trains(tmp_path, sampling):
    """Locked dropout on the output (torch's RNG inside the graph), the state carried across
    replays (sequential) or zeroed (random): the same weights and curve as eagerly."""
    model = {**MODEL, "dropout_output": 0.3}
    eager, graphed, captures = graphed_and_eager(tmp_path, model, {"sampling": sampling, "epochs": 2})
    assert len(captures) == 1  # one capture, replayed for every step after the warm-up
    assert graphed["steps"] == eager["steps"]
    assert_same_training(tmp_path)


def test_cuda_graphs_capture_again_when_the_learning_rate_changes(tmp_path):
    """Adam (its step count on the device) with a decaying rate: a capture per rate."""
    eager, graphed, captures = graphed_and_eager(
        tmp_path, MODEL, {"epochs": 3, "optimizer": "adam", "lr": 0.004, "lr_schedule": "decay", "lr_decay": 0.5})
    assert len(captures) == 3
    assert_same_training(tmp_path, rtol=1e-4, atol=1e-5)


def test_cuda_graphs_resume_as_if_never_stopped(tmp_path):
    """A graphed run stopped by max_steps mid-epoch and resumed with a bigger budget ends where
    the uninterrupted graphed run ends (each process warms up and captures anew)."""
    tr, va, vocab = corpus(40_000)
    model_cfg = ModelConfig(**{**MODEL, "dropout_output": 0.3})
    cfg = TrainConfig(**{**TRAIN, "epochs": 2, "tf32": False, "cuda_graphs": True})
    torch.backends.cudnn.deterministic = True
    try:
        train(tr, va, vocab, model_cfg, cfg, str(tmp_path / "ref"))
        train(tr, va, vocab, model_cfg, TrainConfig(**{**cfg.model_dump(), "max_steps": 40}), str(tmp_path / "run"))
        train(tr, va, vocab, model_cfg, cfg, str(tmp_path / "run"))
    finally:
        torch.backends.cudnn.deterministic = False
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "run")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)
