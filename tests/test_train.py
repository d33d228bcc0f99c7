"""The trainer, single process: clipping, learning, failure handling, checkpoints, exact resume.

Real torch, real subprocesses, no mocks. Models are tiny so the file runs in well
under a minute on two busy cores; helpers here are shared with test_ddp.py.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.training.checkpoint import latest_valid, list_checkpoints, load_checkpoint, save_checkpoint
from pipeline.config import ModelConfig, TrainConfig
from pipeline.errors import EXIT_DO_NOT_RETRY, CheckpointError, NonFiniteLossError
from pipeline.training.launch import launch_training
from pipeline.training.optim import LRSchedule, clip_grad_norm_
from pipeline.training.train import main, train

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "pipeline" / "data" / "timemachine.txt"


# ---------------------------------------------------------------------------- helpers


@functools.cache
def timemachine() -> tuple[np.ndarray, int]:
    """d2l's char tokens of the bundled text: per line non-letters -> space, strip, lowercase."""
    lines = TEXT.read_text(encoding="utf-8").splitlines()
    text = "".join(re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines)
    chars = sorted(set(text))
    lookup = np.zeros(128, dtype=np.int32)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    return lookup[np.frombuffer(text.encode("ascii"), dtype=np.uint8)], len(chars)


def corpus(train_tokens: int, val_tokens: int = 3000) -> tuple[np.ndarray, np.ndarray, int]:
    ids, vocab = timemachine()
    return ids[:train_tokens], ids[-val_tokens:], vocab


def write_inputs(directory: Path, model: dict, train_cfg: dict, train_tokens: int) -> tuple[str, str]:
    """A .npz dataset and a RunConfig YAML for the CLI; returns (dataset, config) paths."""
    directory.mkdir(parents=True, exist_ok=True)
    tr, va, vocab = corpus(train_tokens)
    dataset = directory / "data.npz"
    np.savez(dataset, train=tr, val=va, vocab_size=vocab)
    config = directory / "run.yaml"
    config.write_text(yaml.safe_dump({"model": model, "train": train_cfg}))
    return str(dataset), str(config)


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "RNNLM_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread: on cores shared with other jobs, spinning OpenMP threads crawl."""
    monkeypatch.setenv("RNNLM_NUM_THREADS", "1")  # for train() setting up its own process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # for train(dist_info=...) which leaves threads alone
    yield
    torch.set_num_threads(threads)


def trainer_cmd(run_dir, dataset, config) -> list[str]:
    return [sys.executable, "-m", "pipeline.training.train", "--run-dir", str(run_dir), "--dataset", dataset,
            "--config", config]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)


def epochs_of(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def kill_after_checkpoint(cmd, run_dir, epoch: int, *, victim=None, timeout=120.0) -> str:
    """Start ``cmd``, SIGKILL it (or ``victim(proc)``'s process) once epoch ``epoch``'s
    checkpoint exists; return its output. Fails if the run got further than that."""
    proc = subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ckpts = Path(run_dir) / "checkpoints"
    deadline = time.monotonic() + timeout
    try:
        while not list(ckpts.glob(f"ckpt-{epoch:06d}-*.pt")):
            assert proc.poll() is None, f"run ended before epoch {epoch}:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
            time.sleep(0.01)
        pid = victim(proc) if victim else proc.pid
        os.kill(pid, signal.SIGKILL)
        newest = sorted(p.name for p in ckpts.glob("ckpt-*.pt"))[-1]
        assert newest.startswith(f"ckpt-{epoch:06d}-"), f"killed too late: {newest} already written"
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return out


TINY = {"cell": "gru", "hidden_size": 32, "embed_size": 16}


def poison_gradient_at(monkeypatch, step: int) -> None:
    """Models built from here on get a NaN gradient at their ``step``-th backward: a divergence at a
    known step, on any device (a real one, an exploding lr, diverges wherever the numerics say)."""
    from pipeline.training import run_state

    real = run_state.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        backwards = 0

        def poison(grad):
            nonlocal backwards
            backwards += 1
            return grad * float("nan") if backwards == step else grad

        [p for p in model.parameters() if p.requires_grad][-1].register_hook(poison)
        return model

    monkeypatch.setattr(run_state, "build_model", build)


def check_divergence_names_its_step(tmp_path, monkeypatch, device: str, deferred: bool) -> None:
    """However late the watch reads a step's flag (``deferred``: ``lag`` steps, as on a GPU), the
    error names the step that diverged and no checkpoint holds weights from it or after it."""
    from pipeline.training import run_state
    from pipeline.training.checkpoint import load_checkpoint
    from pipeline.training.divergence import FiniteWatch

    monkeypatch.setattr(run_state, "FiniteWatch", lambda dev: FiniteWatch(dev, deferred=deferred))
    tr, va, vocab = corpus(20_000)  # 71 steps an epoch: step 28 is mid-epoch, its flag read at the checkpoint of step 30
    for every, last_good in ((1, 27), (10, 20)):
        poison_gradient_at(monkeypatch, 28)
        run_dir = tmp_path / f"{device}-every{every}"
        cfg = TrainConfig(epochs=2, batch_size=8, checkpoint_every_steps=every, keep_checkpoints=500, device=device)
        with pytest.raises(NonFiniteLossError, match="at step 28"):
            train(tr, va, vocab, ModelConfig(**TINY), cfg, str(run_dir))
        assert json.loads((run_dir / "FAILED.json").read_text())["step"] == 28
        last = load_checkpoint(list_checkpoints(str(run_dir / "checkpoints"))[-1])
        assert last["step"] == last_good
        assert all(torch.isfinite(t).all() for t in last["model"].values())


# --------------------------------------------------------------------------- clipping


def _params_with_grads(scale: float) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(3, 4), (4,), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return params


def test_clip_grad_norm_scales_to_theta():
    params = _params_with_grads(10.0)
    before = [p.grad.clone() for p in params]
    norm_by_hand = math.sqrt(sum(float((g**2).sum()) for g in before))
    theta = 1.0
    assert norm_by_hand > theta
    norm = float(clip_grad_norm_(params, theta))
    assert norm == pytest.approx(norm_by_hand, rel=1e-6)
    after = math.sqrt(sum(float((p.grad**2).sum()) for p in params))
    assert after <= theta + 1e-6
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, min(theta / norm_by_hand, 1.0) * g, rtol=1e-6, atol=0)


def test_clip_grad_norm_leaves_small_gradients_alone():
    params = _params_with_grads(0.01)
    before = [p.grad.clone() for p in params]
    norm = float(clip_grad_norm_(params, 5.0))
    assert norm < 5.0
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


# --------------------------------------------------------------------------- schedule


def test_lr_schedules():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    decay = LRSchedule(opt, TrainConfig(lr=1.0, lr_schedule="decay", lr_decay=0.5, lr_decay_after=2))
    lrs = [decay.lr]
    for epoch in range(1, 5):
        decay.step(epoch, 10.0)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1.0, 1.0, 0.5, 0.25, 0.125]  # epochs 1-2 at full rate, then halved each epoch

    plateau = LRSchedule(opt, TrainConfig(lr=1.0, lr_schedule="plateau", lr_decay=0.5, lr_patience=2))
    lrs = []
    for epoch, val in enumerate([10, 9, 9.5, 9.2, 8, 8.5, 8.1], start=1):
        plateau.step(epoch, val)
        lrs.append(plateau.lr)
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    restored = LRSchedule(opt, TrainConfig(lr=1.0, lr_schedule="plateau"))
    restored.load_state_dict(plateau.state_dict())
    assert restored.state_dict() == plateau.state_dict()


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("cell,sampling", [("rnn", "sequential"), ("gru", "random"), ("lstm", "sequential")])
def test_each_cell_learns(tmp_path, cell, sampling):
    # ~300 Adam steps: a unigram model scores ~17 on this text, uniform 27.
    tr, va, vocab = corpus(110_000)
    result = train(tr, va, vocab, ModelConfig(cell=cell, hidden_size=64, embed_size=16),
                   TrainConfig(epochs=3, optimizer="adam", lr=0.01, sampling=sampling), str(tmp_path))
    assert result["steps"] >= 250
    assert result["val_ppl"] < 9.0, result
    events = epochs_of(tmp_path)
    assert [e["epoch"] for e in events] == [1, 2, 3]
    assert events[-1]["val_ppl"] < events[0]["val_ppl"]
    assert set(events[0]) == {"event", "epoch", "step", "train_ppl", "val_ppl", "train_bits", "val_bits",
                              "tokens_per_s", "grad_norm", "lr", "elapsed_s"}
    assert events[0]["val_bits"] == math.log2(events[0]["val_ppl"])  # bits per token beside perplexity
    for name in ("model.pt", "model_config.json", "train_config.json", "result.json"):
        assert (tmp_path / name).exists()
    assert json.loads((tmp_path / "model_config.json").read_text())["vocab_size"] == vocab


# --------------------------------------------------------------------------- failures


@pytest.mark.slow
def test_nan_stops_with_do_not_retry_and_keeps_last_checkpoint(tmp_path):
    # An unclipped ReLU RNN at lr=100 explodes within a few steps: a real divergence.
    dataset, config = write_inputs(
        tmp_path, {"cell": "rnn", "nonlinearity": "relu", "hidden_size": 32, "init": "default"},
        {"epochs": 2, "lr": 100.0, "clip_norm": None, "batch_size": 8, "checkpoint_every_steps": 1,
         "keep_checkpoints": 50}, 20_000)
    run_dir = tmp_path / "run"
    proc = subprocess.run(trainer_cmd(run_dir, dataset, config), env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_DO_NOT_RETRY, proc.stderr
    assert "non-finite" in proc.stderr
    failed = json.loads((run_dir / "FAILED.json").read_text())
    assert failed["reason"] == "non_finite_loss" and failed["retryable"] is False
    bad_step = failed["step"]
    ckpts = list_checkpoints(str(run_dir / "checkpoints"))
    assert ckpts, "the steps before the divergence were checkpointed"
    last = load_checkpoint(ckpts[-1])
    assert last["step"] == bad_step - 1  # the step that diverged was never checkpointed
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert not (run_dir / "model.pt").exists()

    # The launcher maps it to a do-not-retry error.
    with pytest.raises(NonFiniteLossError):
        launch_training(str(tmp_path / "run2"), dataset, config, env=child_env())


def test_corrupt_newest_checkpoint_falls_back(tmp_path, caplog):
    tr, va, vocab = corpus(12_000)
    model_cfg = ModelConfig(**TINY)
    train(tr, va, vocab, model_cfg, TrainConfig(epochs=2, optimizer="adam", lr=0.01), str(tmp_path))
    first, newest = list_checkpoints(str(tmp_path / "checkpoints"))
    Path(newest).write_bytes(Path(newest).read_bytes()[:1000])  # a torn write

    with caplog.at_level(logging.INFO):
        ckpt, uri = latest_valid(str(tmp_path / "checkpoints"))
        assert uri == first and ckpt["epoch"] == 1
        assert any("corrupt" in r.message and "ckpt-000002" in r.message for r in caplog.records
                   if r.levelno == logging.WARNING)
        caplog.clear()
        result = train(tr, va, vocab, model_cfg, TrainConfig(epochs=3, optimizer="adam", lr=0.01),
                       str(tmp_path))
    assert result["epochs"] == 3
    assert any(re.match(r"resuming from epoch 1 step \d+ \(.*ckpt-000001-", r.getMessage())
               for r in caplog.records)
    assert [e["epoch"] for e in epochs_of(tmp_path)] == [1, 2, 3]  # the redone epoch 2 once


def test_bad_config_is_do_not_retry(tmp_path):
    dataset, _ = write_inputs(tmp_path, TINY, {}, 12_000)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model": TINY, "train": {"epochs": 1, "lerning_rate": 0.1}}))
    assert main(["--run-dir", str(tmp_path / "run"), "--dataset", dataset, "--config", str(config)]) \
        == EXIT_DO_NOT_RETRY
    failed = json.loads((tmp_path / "run" / "FAILED.json").read_text())
    assert failed["reason"] == "bad_config" and "lerning_rate" in failed["message"]


def checkpoint_steps(run_dir) -> list[int]:
    return [load_checkpoint(u)["step"] for u in list_checkpoints(str(Path(run_dir) / "checkpoints"))]


def assert_same_weights(a_dir, b_dir) -> None:
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


BUDGET_MODEL = ModelConfig(cell="lstm", hidden_size=24, embed_size=8, num_layers=2, dropout=0.3)
BUDGET_TRAIN = dict(epochs=2, optimizer="adam", lr=0.01, batch_size=8, keep_checkpoints=100)  # 42 steps an epoch


def test_max_minutes_stops_at_the_next_step_and_a_bigger_budget_continues_exactly(tmp_path):
    """A budget so small it is spent by the first step: the run stops there, mid-epoch, with a
    validation and a checkpoint, and carries on as if never stopped (dropout: the RNG state too)."""
    tr, va, vocab = corpus(12_000)
    train(tr, va, vocab, BUDGET_MODEL, TrainConfig(**BUDGET_TRAIN), str(tmp_path / "ref"))
    run = str(tmp_path / "run")
    result = train(tr, va, vocab, BUDGET_MODEL, TrainConfig(**BUDGET_TRAIN, max_minutes=1e-6), run)
    assert (result["epochs"], result["steps"], result["finished"]) == (0, 1, False)
    assert result["stopped"] == "max_minutes=1e-06" and result["val_ppl"] is not None
    [line] = epochs_of(run)
    assert line["event"] == "eval" and line["step"] == 1 and line["val_ppl"] == result["val_ppl"]
    assert checkpoint_steps(run) == [1] and load_checkpoint(list_checkpoints(run + "/checkpoints")[0])["rng"]
    again = train(tr, va, vocab, BUDGET_MODEL, TrainConfig(**BUDGET_TRAIN, max_minutes=1e-6), run)
    assert again["steps"] == 1  # the budget is spent
    more = train(tr, va, vocab, BUDGET_MODEL, TrainConfig(**BUDGET_TRAIN), run)
    assert more["epochs"] == 2 and more["finished"] is True and more["stopped"] is None
    assert_same_weights(tmp_path / "ref", run)
    ref_epochs = [e for e in epochs_of(tmp_path / "ref") if e["event"] == "epoch"]
    run_epochs = [e for e in epochs_of(run) if e["event"] == "epoch"]
    assert [e["train_ppl"] for e in run_epochs] == pytest.approx([e["train_ppl"] for e in ref_epochs], rel=1e-6)


def test_max_steps_stops_mid_epoch_and_resumes_bit_exact(tmp_path):
    tr, va, vocab = corpus(12_000)
    cfg = dict(BUDGET_TRAIN, checkpoint_every_steps=20)  # a budget stop between periodic checkpoints
    train(tr, va, vocab, BUDGET_MODEL, TrainConfig(**cfg), str(tmp_path / "ref"))
    run = str(tmp_path / "run")
    result = train(tr, va, vocab, BUDGET_MODEL, TrainConfig(**cfg, max_steps=55), run)
    assert (result["epochs"], result["steps"], result["stopped"]) == (1, 55, "max_steps=55")
    assert checkpoint_steps(run) == [20, 40, 42, 55]
    assert [(e["event"], e["step"]) for e in epochs_of(run)] == [("epoch", 42), ("eval", 55)]
    train(tr, va, vocab, BUDGET_MODEL, TrainConfig(**cfg, max_steps=70), run)  # a bigger budget
    assert checkpoint_steps(run)[-1] == 70
    done = train(tr, va, vocab, BUDGET_MODEL, TrainConfig(**cfg), run)
    assert done["steps"] == 84 and done["finished"]
    assert_same_weights(tmp_path / "ref", run)
    assert epochs_of(run)[-1]["train_ppl"] == pytest.approx(epochs_of(tmp_path / "ref")[-1]["train_ppl"], rel=1e-6)


def test_eval_every_steps_writes_one_line_and_checkpoint_per_evaluation(tmp_path):
    tr, va, vocab = corpus(12_000)
    cfg = TrainConfig(**BUDGET_TRAIN, eval_every_steps=25)
    result = train(tr, va, vocab, BUDGET_MODEL, cfg, str(tmp_path))
    lines = epochs_of(tmp_path)
    # every 25 steps, and a final validation at the end (84 steps: 2 epochs of 42)
    assert [(e["event"], e["step"]) for e in lines] == [("eval", 25), ("eval", 50), ("eval", 75), ("eval", 84)]
    assert all(e["val_ppl"] and e["train_ppl"] for e in lines)
    assert lines[0]["epochs"] == pytest.approx(25 / 42)
    assert checkpoint_steps(tmp_path) == [25, 42, 50, 75, 84]
    assert result["val_ppl"] == min(e["val_ppl"] for e in lines)  # keep_best over evaluations


def test_early_stopping_counts_evaluations(tmp_path):
    """A tiny training set overfits: validation stops improving, and ``patience`` counts evaluations."""
    tr, va, vocab = corpus(3000, val_tokens=2000)
    cfg = TrainConfig(epochs=12, optimizer="adam", lr=0.02, batch_size=8, num_steps=20, eval_every_steps=6,
                      patience=2)
    result = train(tr, va, vocab, ModelConfig(cell="gru", hidden_size=128, embed_size=16), cfg, str(tmp_path))
    vals = [e["val_ppl"] for e in epochs_of(tmp_path)]
    best = int(np.argmin(vals))
    assert len(vals) == best + 1 + 2, vals  # stopped at the second evaluation without a better one
    assert result["steps"] == 6 * len(vals) and not result["finished"]
    assert result["stopped"] == "no better validation for 2 evaluations"
    assert result["best_step"] == 6 * (best + 1) and result["val_ppl"] == vals[best]


def test_checkpoint_from_another_config_is_refused(tmp_path):
    tr, va, vocab = corpus(12_000)
    train(tr, va, vocab, ModelConfig(**TINY), TrainConfig(epochs=1), str(tmp_path))
    with pytest.raises(CheckpointError, match="hidden_size"):
        train(tr, va, vocab, ModelConfig(**{**TINY, "hidden_size": 48}), TrainConfig(epochs=2), str(tmp_path))
    assert json.loads((tmp_path / "FAILED.json").read_text())["reason"] == "bad_checkpoint"


def test_keeps_last_k_and_rejects_garbage(tmp_path):
    d = str(tmp_path)
    state = {"model": {"w": torch.ones(2)}, "optimizer": {}, "scheduler": {}, "epoch_stats": {},
             "elapsed_s": 0.0, "model_config": {}, "train_config": {}, "vocab_size": 3, "world_size": 1}
    for step in (5, 10, 15):
        save_checkpoint(d, {**state, "epoch": step // 5, "step": step}, keep=2)
    assert [Path(u).name for u in list_checkpoints(d)] == ["ckpt-000002-0000000010.pt",
                                                           "ckpt-000003-0000000015.pt"]
    assert not list(tmp_path.glob("*.tmp-*"))
    (tmp_path / "ckpt-000009-0000000099.pt").write_bytes(b"not a checkpoint")
    assert latest_valid(d)[0]["step"] == 15


# --------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(tmp_path):
    # ~1 s epochs, so the kill lands well inside epoch 2.
    dataset, config = write_inputs(tmp_path, {**TINY, "dropout": 0.2},
                                   {"epochs": 3, "optimizer": "sgd", "lr": 1.0, "momentum": 0.5}, 100_000)
    ref = tmp_path / "ref"
    subprocess.run(trainer_cmd(ref, dataset, config), env=child_env(), cwd=REPO, check=True,
                   capture_output=True, timeout=300)

    run = tmp_path / "run"
    kill_after_checkpoint(trainer_cmd(run, dataset, config), run, epoch=1)
    assert not (run / "model.pt").exists()
    again = subprocess.run(trainer_cmd(run, dataset, config), env=child_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert re.search(r"resuming from epoch 1 step \d+ \(.*ckpt-000001-", again.stderr), again.stderr

    a, b = weights(ref), weights(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["epoch"] for e in epochs_of(run)] == [1, 2, 3]
    assert epochs_of(run)[-1]["train_ppl"] == epochs_of(ref)[-1]["train_ppl"]


@pytest.mark.parametrize("cell", ["lstm"])
def test_mid_epoch_resume_is_bit_exact(tmp_path, cell):
    """Resuming from a mid-epoch checkpoint (sequential: hidden state restored, dropout reseeded)."""
    tr, va, vocab = corpus(12_000)
    model_cfg = ModelConfig(cell=cell, hidden_size=24, embed_size=8, num_layers=2, dropout=0.3)
    cfg = TrainConfig(epochs=2, optimizer="adam", lr=0.01, batch_size=8, checkpoint_every_steps=7,
                      keep_checkpoints=100)
    train(tr, va, vocab, model_cfg, cfg, str(tmp_path / "ref"))
    mid = [u for u in list_checkpoints(str(tmp_path / "ref" / "checkpoints"))
           if Path(u).name.startswith("ckpt-000001-")][1]  # [0] ends epoch 1, [1] is inside epoch 2
    assert load_checkpoint(mid)["hidden"] is not None
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(mid, tmp_path / "run" / "checkpoints")
    train(tr, va, vocab, model_cfg, cfg, str(tmp_path / "run"))
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref_ppl, run_ppl = epochs_of(tmp_path / "ref")[-1]["train_ppl"], epochs_of(tmp_path / "run")[-1]["train_ppl"]
    assert run_ppl == pytest.approx(ref_ppl, rel=1e-6)  # the epoch's loss sums survived too


# ------------------------------------------------------------------------ best weights


def test_keep_best_ships_the_epoch_with_the_lowest_val_ppl(tmp_path):
    """A tiny training set overfits within a few epochs: validation bottoms out, then rises."""
    from pipeline.model.evaluate import perplexity
    from pipeline.model.models import build_model

    tr, va, vocab = corpus(3000, val_tokens=2000)
    model_cfg = ModelConfig(cell="gru", hidden_size=128, embed_size=16)
    runs = {}
    for keep_best in (True, False):
        cfg = TrainConfig(epochs=12, optimizer="adam", lr=0.02, batch_size=8, num_steps=20, keep_best=keep_best)
        runs[keep_best] = (train(tr, va, vocab, model_cfg, cfg, str(tmp_path / str(keep_best))), tmp_path / str(keep_best))
    events = epochs_of(runs[True][1])
    vals = [e["val_ppl"] for e in events]
    best_epoch = int(np.argmin(vals)) + 1
    assert best_epoch < len(vals), vals  # it did overfit: the best epoch is not the last
    kept, last = runs[True][0], runs[False][0]
    assert kept["best_epoch"] == best_epoch and kept["val_ppl"] == pytest.approx(min(vals), rel=1e-9)
    assert last["val_ppl"] == pytest.approx(vals[-1], rel=1e-9) and last["val_ppl"] > kept["val_ppl"]
    model = build_model(model_cfg, vocab)
    model.load_state_dict(weights(runs[True][1]))
    assert perplexity(model, va) == min(vals)  # the one evaluation setting, bit for bit


def test_cuda_graphs_name_what_rules_them_out(tmp_path):
    """train.cuda_graphs is for one CUDA process; each conflict is named (tests/test_gpu.py trains with it)."""
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError
    from pipeline.training.cuda_graph import check_cuda_graphs

    for extra, named in (({"variable_bptt": True}, "variable_bptt"), ({"precision": "fp16"}, "precision fp16"),
                         ({"optimizer": "nt_asgd"}, "optimizer nt_asgd")):
        with pytest.raises(ConfigError, match=f"cuda_graphs cannot be used with {named}"):
            parse_config(TrainConfig, {"cuda_graphs": True, **extra})
    graphs = TrainConfig(cuda_graphs=True)
    cuda = torch.device("cuda")
    check_cuda_graphs(ModelConfig(), graphs, cuda, 1)  # fine
    check_cuda_graphs(ModelConfig(), TrainConfig(), torch.device("cpu"), 2)  # off: nothing to check
    with pytest.raises(ConfigError, match="one process .this run has 2 ranks.*softmax: full"):
        check_cuda_graphs(ModelConfig(softmax="adaptive", adaptive_cutoffs=(5,)), graphs, cuda, 2)
    tr, va = np.arange(2000) % 20, np.arange(200) % 20
    with pytest.raises(ConfigError, match="needs a CUDA device .this run trains on cpu"):
        train(tr, va, 20, ModelConfig(hidden_size=8), TrainConfig(cuda_graphs=True, device="cpu"), str(tmp_path / "r"))
    assert json.loads((tmp_path / "r" / "FAILED.json").read_text())["retryable"] is False
