"""Training runs as users drive them: a bigger budget, finite divergence, one evaluation,
two launches of one run, a killed launcher. Real processes, tiny models, no mocks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.training.checkpoint import list_checkpoints
from pipeline.config import ModelConfig, TrainConfig
from pipeline.errors import NonFiniteLossError
from pipeline.model.evaluate import perplexity
from pipeline.training.launch import run_directory
from pipeline.model.models import build_model
from pipeline.training.train import train
from tests.test_cli import RNNLM, SMALL, env, rnnlm
from tests.test_train import (TINY, check_divergence_names_its_step, child_env, corpus, epochs_of,  # noqa: F401
                              one_thread, weights, write_inputs)

DIVERGING = {"optimizer": "sgd", "lr": 1e6, "clip_norm": None}  # the loss grows to ~1e7, never NaN


# ----------------------------------------------------------------------- bigger budget


def test_more_epochs_continue_the_same_run_bit_exact(tmp_path):
    tr, va, vocab = corpus(12_000)
    model_cfg = ModelConfig(**{**TINY, "num_layers": 2, "dropout": 0.2})
    cfg = {"optimizer": "adam", "lr": 0.01, "lr_schedule": "decay", "lr_decay": 0.9, "lr_decay_after": 5}
    short, long = TrainConfig(epochs=10, **cfg), TrainConfig(epochs=20, **cfg)
    run_dir = run_directory(str(tmp_path / "root"), "dataset", model_cfg, short)
    assert run_directory(str(tmp_path / "root"), "dataset", model_cfg, long) == run_dir  # same run, more budget

    assert train(tr, va, vocab, model_cfg, short, run_dir)["epochs"] == 10
    continued = train(tr, va, vocab, model_cfg, long, run_dir)
    reference = train(tr, va, vocab, model_cfg, long, str(tmp_path / "reference"))
    a, b = weights(run_dir), weights(tmp_path / "reference")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("val_ppl", "epochs", "steps", "best_epoch", "finished"):
        assert continued[key] == reference[key], key
    assert continued["tokens_per_s"] and continued["steps"] == 2 * train_steps_of(run_dir, 10)
    drop = ("tokens_per_s", "elapsed_s")
    assert [{k: v for k, v in e.items() if k not in drop} for e in epochs_of(run_dir)] == \
        [{k: v for k, v in e.items() if k not in drop} for e in epochs_of(tmp_path / "reference")]


def train_steps_of(run_dir, epoch: int) -> int:
    return next(e["step"] for e in epochs_of(run_dir) if e["epoch"] == epoch)


def test_the_train_task_key_follows_the_budget_but_the_run_directory_does_not():
    from tasks.train import run_id, train_identity

    dataset = {"dataset_id": "d", "manifest_sha256": "m", "uri": "/nowhere"}
    keys, ids = [], []
    for train_cfg in (TrainConfig(epochs=10), TrainConfig(epochs=20), TrainConfig(epochs=10, max_minutes=5)):
        inputs = {"dataset": dataset, "model_config": ModelConfig(), "train_config": train_cfg, "root": "/r"}
        keys.append(train_identity(inputs))
        ids.append(run_id(dataset, ModelConfig(), train_cfg))
    assert len(set(ids)) == 1 and len({json.dumps(k, sort_keys=True) for k in keys}) == 3
    assert run_id(dataset, ModelConfig(), TrainConfig(lr=0.5)) != ids[0]  # what the weights depend on


# ------------------------------------------------------------------ finite divergence


def test_a_loss_that_overflows_without_nan_is_divergence(tmp_path):
    tr, va, vocab = corpus(12_000)
    with pytest.raises(NonFiniteLossError, match="no checkpoint yet"):
        train(tr, va, vocab, ModelConfig(**TINY), TrainConfig(epochs=3, **DIVERGING), str(tmp_path))
    failed = json.loads((tmp_path / "FAILED.json").read_text())
    assert failed["reason"] == "non_finite_loss" and failed["retryable"] is False
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "result.json").exists()


def test_divergence_after_a_good_checkpoint_keeps_it(tmp_path):
    tr, va, vocab = corpus(12_000)
    cfg = TrainConfig(epochs=3, checkpoint_every_steps=1, keep_checkpoints=100, **DIVERGING)
    with pytest.raises(NonFiniteLossError, match="the last good checkpoint is kept") as caught:
        train(tr, va, vocab, ModelConfig(**TINY), cfg, str(tmp_path))
    kept = list_checkpoints(str(tmp_path / "checkpoints"))
    assert kept and kept[-1] in str(caught.value)
    assert json.loads((tmp_path / "FAILED.json").read_text())["step"] == int(Path(kept[-1]).stem.split("-")[2]) + 1
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("deferred", [False, True], ids=["immediate", "lagged"])
def test_divergence_names_its_step_and_keeps_only_good_checkpoints(tmp_path, monkeypatch, deferred):
    check_divergence_names_its_step(tmp_path, monkeypatch, "cpu", deferred)


def test_epoch_log_line_never_fails_on_missing_figures():
    from tasks.train import _format_epoch

    line = _format_epoch({"epoch": 2, "train_ppl": None, "val_ppl": None, "tokens_per_s": 10.0, "lr": 1e6,
                          "grad_norm": float("inf"), "elapsed_s": 1.0}, 3)
    assert "train ppl n/a" in line and "val ppl n/a" in line and "grad norm inf" in line


def test_rnnlm_train_on_a_diverging_config_exits_do_not_retry_and_ships_nothing(tmp_path):
    sets = [a for k, v in DIVERGING.items() for a in ("--set", f"train.{k}={'null' if v is None else v}")]
    proc = rnnlm("train", *SMALL, "--set", "train.epochs=2", *sets, cwd=tmp_path, check=False)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "diverged" in proc.stderr and "no checkpoint yet" in proc.stderr
    [run_dir] = (tmp_path / ".rnnlm" / "runs").iterdir()
    assert json.loads((run_dir / "FAILED.json").read_text())["reason"] == "non_finite_loss"
    assert not (run_dir / "model.pt").exists()


# ---------------------------------------------------------------------- one evaluation


def test_the_trainers_validation_is_the_one_evaluation(tmp_path):
    """Whatever the training batch, val_ppl is pipeline.model.evaluate's figure for the shipped model, bit for bit."""
    tr, va, vocab = corpus(12_000)
    model_cfg = ModelConfig(**TINY)
    result = train(tr, va, vocab, model_cfg, TrainConfig(epochs=2, batch_size=8, num_steps=20, optimizer="adam",
                                                         lr=0.01), str(tmp_path))
    model = build_model(model_cfg, vocab)
    model.load_state_dict(weights(tmp_path))
    assert result["val_ppl"] == perplexity(model, va)
    assert result["val_ppl"] == min(e["val_ppl"] for e in epochs_of(tmp_path))  # the logged figure too


# ------------------------------------------------------------------- one run, one trainer

LONG = [*SMALL, "--set", "train.epochs=150", "--set", "train.patience=null"]  # long enough that the second starts mid-run


def start_rnnlm_train(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([RNNLM, "train", *args], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read_until(proc: subprocess.Popen, predicate) -> tuple[str, list[str]]:
    """Lines of ``proc`` up to and including the first one ``predicate`` accepts."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if predicate(line):
            return line, seen
    raise AssertionError(f"exited ({proc.wait()}) before the expected line:\n{''.join(seen)[-3000:]}")


def _is_epoch(line: str) -> bool:
    return line.startswith('{"event": "epoch"')


def test_two_rnnlm_train_on_one_run_never_interleave(tmp_path):
    first = start_rnnlm_train(tmp_path, *LONG)
    second = None
    try:
        _, seen = read_until(first, _is_epoch)  # the first trainer is mid-run
        run_dir = next(line.split()[2] for line in seen if line.startswith("training in "))
        second = start_rnnlm_train(tmp_path, *LONG)
        out_first, _ = first.communicate(timeout=600)
        out_second, _ = second.communicate(timeout=600)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert first.returncode == 0 and second.returncode == 0, out_first[-2000:] + out_second[-2000:]
    assert "waiting for it to finish" in out_second
    assert [e["epoch"] for e in epochs_of(run_dir)] == list(range(1, 151))  # each epoch once
    assert json.loads(out_second[out_second.rindex("{\n"):])["epochs"] == 150


# --------------------------------------------------------------------- killed launcher

SUPERVISOR = textwrap.dedent("""
    # Adopts orphans (PR_SET_CHILD_SUBREAPER) so it can read the trainer's exit status
    # once its launcher, `rnnlm train`, is SIGKILLed mid-run.
    import ctypes, json, os, signal, subprocess, sys
    import psutil
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
    launcher = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in launcher.stdout:
        if line.startswith('{"event": "epoch"'):
            break
    [trainer] = [p for p in psutil.Process(launcher.pid).children() if "pipeline.training.train" in p.cmdline()]
    launcher.kill()
    launcher.wait()
    _, status = os.waitpid(trainer.pid, 0)
    print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_CHILD_SUBREAPER is Linux's")
def test_killing_the_launcher_stops_the_trainer_and_keeps_metrics_whole(tmp_path):
    args = [*SMALL, "--set", "train.epochs=200", "--set", "train.keep_checkpoints=500"]
    proc = subprocess.run([sys.executable, "-c", SUPERVISOR, RNNLM, "train", *args], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    # Stopped by its launcher watch (SIGTERM): not training on unobserved, not dying of a broken pipe.
    assert outcome == {"signal": signal.SIGTERM, "exit": None}
    [run_dir] = (tmp_path / ".rnnlm" / "runs").iterdir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in lines]  # every line whole
    assert epochs == list(range(1, len(epochs) + 1))
    newest = int(Path(list_checkpoints(str(run_dir / "checkpoints"))[-1]).name.split("-")[1])
    assert epochs[-1] == newest  # every checkpointed epoch has its line
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]
