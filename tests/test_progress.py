"""The live progress display: `rnnlm` under a pseudo-terminal shows it and updates it; piped, the
plain per-epoch lines stay. Plus the display's arithmetic and the trainer's throttled line."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import struct
import subprocess
import termios
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flows.progress import ProgressDisplay, TrainView, chunks_done, clock, epochs_in_budget
from pipeline import progress
from pipeline.training.progress import ProgressReporter
from tests.test_cli import RNNLM, env, rnnlm

# Six short epochs; with RNNLM_PROGRESS_EVERY_S=0 (FAST_LINES) the trainer prints a progress line every step.
TRAINING = ["--set", "data.splits.max_tokens=30000", "--set", "model.hidden_size=32", "--set", "model.embed_size=16",
            "--set", "train.epochs=6", "--set", "train.max_minutes=null"]
FAST_LINES = {progress.EVERY_S_ENV: "0"}  # a line every step: frames do not depend on the speed
STEP = re.compile(r"step (\d+)/(\d+)")


def in_terminal(*args: str, cwd: Path, timeout: float = 600, **extra) -> tuple[int, str]:
    """Run ``rnnlm ARGS`` with stdin, stdout and stderr on a pseudo-terminal (200 columns); its exit
    code and everything it wrote there."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen([RNNLM, *args], cwd=cwd, env=env(TERM="xterm-256color", **extra),
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), out.decode("utf-8", errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def last_frame(screen: str) -> list[str]:
    """The display's lines up to its last frame (it shows the cursor again when it stops), without
    terminal escapes: the last frame's rows are the last lines."""
    drawn = screen[:screen.rindex("\x1b[?25h")]
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    return [line.rstrip() for line in re.split(r"[\r\n]+", plain) if line.strip()]


def test_clock_and_the_epochs_a_budget_allows():
    assert clock(62) == "1:02" and clock(3725) == "1:02:05" and clock(None) == "?"
    assert epochs_in_budget(100, None, 12.0) == 100
    assert epochs_in_budget(100, 3, None) == 100  # no rate yet: the configured epochs
    assert epochs_in_budget(100, 3, 12.0) == 16  # the epoch that crosses 180 s is the last
    assert epochs_in_budget(10, 3, 12.0) == 10


def test_train_view_shows_the_budget_and_an_eta():
    view = TrainView()
    base = {"event": "progress", "stage": "train", "epochs": 100, "steps_per_epoch": 10, "loss": 2.5,
            "tokens_per_s": 12345.0, "max_minutes": 3}
    view.absorb({**base, "epoch": 1, "step": 2, "elapsed_s": 2.0})
    view.absorb({**base, "epoch": 1, "step": 7, "elapsed_s": 7.0})  # 1 s a step: 10 s an epoch
    view.absorb({"event": "epoch", "epoch": 1, "step": 10, "val_ppl": 9.876, "elapsed_s": 10.0})
    done, total, text = view.render()
    assert (done, total) == (10, 190)  # 19 epochs of 10 steps fit the 3 minutes
    assert "epoch 1/≤19 (3-min budget)" in text and "step 10/10" in text and "12,345 tok/s" in text
    assert "loss 2.500" in text and "val ppl 9.88" in text and "0:10 / 3:00" in text and "ETA 3:00" in text


def test_one_line_per_stage_when_chunk_tasks_report_from_many_threads():
    from rich.console import Console

    display = ProgressDisplay(Console(file=io.StringIO(), force_terminal=True, width=160))
    hook = chunks_done("count", 64)
    with display.bars, progress.listening(display):
        threads = [threading.Thread(target=lambda: [hook(None, None, None) for _ in range(8)]) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert list(display.rows) == ["prepare"]
    assert display.bars.tasks[0].completed == 64 and len(display.bars.tasks) == 1


def test_the_trainer_prints_a_throttled_progress_line_only_when_asked(monkeypatch):
    monkeypatch.delenv(progress.EVERY_S_ENV, raising=False)
    run = SimpleNamespace(epoch=0, step=0, steps_per_epoch=100, val_ppl=None, elapsed=lambda: 1.0,
                          cfg=SimpleNamespace(epochs=3, max_minutes=None))
    out = io.StringIO()
    with redirect_stdout(out):
        for reporter in (ProgressReporter(is_main=True, every_s=0.05), ProgressReporter(is_main=False, every_s=0.05)):
            for _ in range(6):
                run.step += 1
                reporter.step(run, torch.tensor(2.0), tokens=64)
                time.sleep(0.02)
        silent = ProgressReporter(is_main=True)  # a trainer started by hand: no lines
        silent.step(run, torch.tensor(2.0), tokens=64)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert 1 <= len(lines) <= 3, lines  # 6 steps of ~20 ms at most every 50 ms; rank 0 only
    assert all(e["event"] == "progress" and e["loss"] == pytest.approx(2.0) and e["tokens_per_s"] > 0 for e in lines)


@pytest.mark.slow
def test_run_on_a_terminal_shows_live_progress_and_piped_the_epoch_lines(tmp_path):
    (tmp_path / "tty").mkdir()
    code, screen = in_terminal("run", "--no-register", *TRAINING, "--set", "data.chunk_bytes=16384",
                               cwd=tmp_path / "tty", **FAST_LINES)
    assert code == 0, screen[-5000:]
    steps = {m.group(0) for m in STEP.finditer(screen)}
    assert len(steps) >= 3 and "tok/s" in screen and "loss " in screen and "epoch 6/6" in screen, screen[-5000:]
    *_, before, prepare, train = last_frame(screen)  # one line per stage, however many chunk tasks report
    assert re.match(r"prepare .* encode 11/11 chunks", prepare) and train.startswith("train ") \
        and not before.startswith("prepare"), screen[-5000:]
    assert "rnnlm run: done" in screen  # the summary follows the display
    assert "checkpoint /" not in screen and "epoch 1/6: train ppl" not in screen  # the plain lines are in the log
    log = next((tmp_path / "tty" / ".rnnlm" / "logs").glob("run-*.log")).read_text()
    assert "epoch 1/6: train ppl" in log and "epoch 6/6: train ppl" in log

    (tmp_path / "pipe").mkdir()
    piped = rnnlm("run", "--no-register", *TRAINING, cwd=tmp_path / "pipe", **FAST_LINES)
    for e in range(1, 7):
        assert f"epoch {e}/6: train ppl" in piped.stderr
    assert "tok/s" not in piped.stderr + piped.stdout and '"progress"' not in piped.stderr + piped.stdout


def test_train_on_a_terminal_shows_progress_and_quiet_the_plain_lines(tmp_path):
    code, screen = in_terminal("train", *TRAINING, cwd=tmp_path, **FAST_LINES)
    assert code == 0, screen[-5000:]
    assert len({m.group(0) for m in STEP.finditer(screen)}) >= 3 and "tok/s" in screen, screen[-5000:]
    assert '"event": "epoch"' not in screen  # the display, not the JSON lines

    (tmp_path / "quiet").mkdir()
    code, plain = in_terminal("train", "--quiet", *TRAINING, cwd=tmp_path / "quiet", **FAST_LINES)
    assert code == 0, plain[-5000:]
    assert plain.count('"event": "epoch"') == 6 and "tok/s" not in plain and '"progress"' not in plain


def test_prepare_on_a_terminal_shows_progress(tmp_path):
    code, screen = in_terminal("prepare", "--set", "data.chunk_bytes=16384", cwd=tmp_path)
    assert code == 0, screen[-5000:]
    counted = {int(m.group(1)) for m in re.finditer(r"count (\d+)/(\d+) chunks", screen)}
    assert len(counted) >= 2 and re.search(r"encode (\d+)/\1 chunks", screen), screen[-5000:]
    summary = screen[screen.index("{"):]
    assert '"vocab_size": 28' in summary
