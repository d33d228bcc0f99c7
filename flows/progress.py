"""The live progress display on a terminal: one rich progress line per stage.

``live_progress()`` subscribes a :class:`ProgressDisplay` to ``pipeline.progress`` for the
length of a command. The stages publish (``prepare``: chunks counted and encoded; ``train``:
the trainer's throttled progress lines and its per-epoch lines, relayed by the launcher) and
the display turns each event into its stage's line, e.g.::

    prepare  ━━━━━━━━━━━━━━━━━━━━━━━━ encode 11/11 chunks
    train    ━━━━━━━━━━╸━━━━━━━━━━━━━ epoch 3/≤15 (3-min budget)  step 120/391  45,210 tok/s  loss 2.310  val ppl 9.87  1:02 / 3:00  ETA 1:58

While it shows, log records below WARNING go only to the log file (there is one for
``rnnlm run``); ``--quiet``, ``--verbose`` and output that is not a terminal keep the plain lines.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

from pipeline import progress

def wanted(quiet: bool, verbose: bool, stream=None) -> bool:
    """Show the display: on a terminal, unless the user asked for plain lines."""
    stream = stream or sys.stderr
    return not (quiet or verbose) and stream.isatty()


def clock(seconds: Optional[float]) -> str:
    """``m:ss`` (``h:mm:ss`` past an hour); ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def epochs_in_budget(epochs: int, max_minutes: Optional[float], seconds_per_epoch: Optional[float]) -> int:
    """How many epochs the run will train: all ``epochs``, or fewer where ``max_minutes`` ends it first.

    The trainer checks the budget at each epoch end and stops once the training time is past it,
    so the epoch during which the budget runs out is the last one.
    """
    if max_minutes is None or not seconds_per_epoch:
        return epochs
    return max(1, min(epochs, math.floor(max_minutes * 60 / seconds_per_epoch) + 1))


@dataclass
class TrainView:
    """What the train line shows, folded from the trainer's events."""

    epoch: int = 0  # the epoch in progress (1-based)
    epochs: int = 0
    step: int = 0  # in the epoch
    steps_per_epoch: int = 0
    loss: Optional[float] = None
    tokens_per_s: Optional[float] = None
    val_ppl: Optional[float] = None
    elapsed_s: float = 0.0
    max_minutes: Optional[float] = None
    first: Optional[tuple[int, float]] = None  # (global step, elapsed) at the first event: the rate's origin
    note: str = ""

    def absorb(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            for key in ("epoch", "epochs", "step", "steps_per_epoch", "loss", "tokens_per_s", "elapsed_s",
                        "max_minutes"):
                setattr(self, key, event.get(key))
            self.val_ppl = event.get("val_ppl", self.val_ppl)
        elif kind == "epoch":  # the epoch is done: its validation, and the next one starts at step 0
            done = int(event.get("epoch") or 0)
            if done and not self.steps_per_epoch:
                self.steps_per_epoch = int(event.get("step") or 0) // done
            self.epoch, self.step = done, self.steps_per_epoch
            self.val_ppl = event.get("val_ppl")
            self.tokens_per_s = event.get("tokens_per_s", self.tokens_per_s)
            self.elapsed_s = event.get("elapsed_s") or self.elapsed_s
        elif kind == "resume":
            self.note = f"resumed at epoch {event.get('epoch')}"
        if self.first is None and self.steps_per_epoch:
            self.first = (self.global_step, self.elapsed_s)

    @property
    def global_step(self) -> int:
        return max(0, self.epoch - 1) * self.steps_per_epoch + self.step

    def seconds_per_step(self) -> Optional[float]:
        """Training time per step so far in this attempt (validation included), once measurable."""
        if self.first is None or self.global_step <= self.first[0]:
            return None
        return (self.elapsed_s - self.first[1]) / (self.global_step - self.first[0])

    def render(self) -> tuple[int, int, str]:
        """(steps done, steps the run will take, the line's text)."""
        per_step = self.seconds_per_step()
        epochs = self.epochs or self.epoch
        limit = epochs_in_budget(epochs, self.max_minutes, per_step and per_step * self.steps_per_epoch)
        total = max(1, limit * self.steps_per_epoch)
        if limit < epochs:
            shown = f"epoch {self.epoch}/≤{limit} ({self.max_minutes:g}-min budget)"
        else:
            shown = f"epoch {self.epoch}/{epochs}"
        parts = [shown, f"step {self.step}/{self.steps_per_epoch}"]
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.val_ppl is not None:
            parts.append(f"val ppl {self.val_ppl:.2f}")
        budget = f" / {clock(self.max_minutes * 60)}" if self.max_minutes is not None else ""
        parts.append(f"{clock(self.elapsed_s)}{budget}")
        eta = (total - self.global_step) * per_step if per_step is not None else None
        parts.append(f"ETA {clock(eta)}")
        if self.note:
            parts.append(self.note)
        return min(self.global_step, total), total, "  ".join(parts)


class ProgressDisplay:
    """A ``pipeline.progress`` listener drawing one rich progress line per stage."""

    def __init__(self, console):
        from rich.progress import BarColumn, Progress, TextColumn

        self.bars = Progress(TextColumn("[bold]{task.description:<8}"), BarColumn(bar_width=24),
                             TextColumn("{task.fields[detail]}"), console=console, refresh_per_second=4)
        self.rows: dict[str, Any] = {}
        self.train = TrainView()
        self.phase: tuple[Optional[str], int] = (None, 0)  # prepare's phase and its chunks done
        self.lock = threading.Lock()  # mapped chunk tasks publish from several threads at once

    def __call__(self, event: dict[str, Any]) -> None:
        with self.lock:
            self._show(event)

    def _show(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        stage = event.get("stage") or ("train" if kind in ("epoch", "resume") else None)
        if stage == "train":
            self.train.absorb(event)
            done, total, detail = self.train.render()
        elif stage == "prepare" and kind == "progress":
            phase, done, total = event.get("phase"), int(event["done"]), int(event["total"])
            if phase == self.phase[0]:  # chunk tasks finishing together may publish out of order
                done = max(done, self.phase[1])
            self.phase = (phase, done)
            detail = f"{phase} {done}/{total} chunks"
        else:
            return
        if stage not in self.rows:
            self.rows[stage] = self.bars.add_task(stage, total=total, detail="")
        self.bars.update(self.rows[stage], completed=done, total=total, detail=detail, refresh=True)

    def finish(self) -> None:
        """Fill every bar: the stages are done (a budget may end training short of its planned steps)."""
        with self.lock:
            rows = list(self.rows.values())
        for row in rows:
            task = self.bars.tasks[row]
            self.bars.update(row, completed=task.total, refresh=True)


def chunks_done(phase: str, total: int):
    """A Prefect ``on_completion`` hook for a mapped chunk stage of the ``prepare-data`` flow:
    publishes ``phase done/total`` as each chunk's task run completes (from cache too)."""
    done = itertools.count(1)

    def hook(task, task_run, state) -> None:
        progress.publish({"event": "progress", "stage": "prepare", "phase": phase, "done": next(done), "total": total})

    return hook


@contextlib.contextmanager
def live_progress(enabled: bool) -> Iterator[Optional[ProgressDisplay]]:
    """Show the display on stderr while the block runs (yields it), or do nothing (yields None)."""
    if not enabled:
        yield None
        return
    from rich.console import Console

    from flows.terminal import console_above_display

    display = ProgressDisplay(Console(stderr=True))
    # MLflow logs through its own terminal handler, set up when the registry first imports it
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    with display.bars, console_above_display(), progress.listening(display):
        yield display
        display.finish()
