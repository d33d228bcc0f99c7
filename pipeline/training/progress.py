"""Rank 0's live progress line: where the epoch is, how fast, the running loss.

``ProgressReporter.step`` is called once per training step. It adds the step's loss to a
device-side sum (no host sync) and, at most every ``RNNLM_PROGRESS_EVERY_S`` seconds, reads
that sum once and prints one JSON line on stdout, which the launcher publishes to the display
(``pipeline.progress``). Without that variable (a trainer started by hand) and on other ranks
it does nothing.
"""

from __future__ import annotations

import json
import os
import time

import torch

from pipeline.progress import EVERY_S_ENV
from pipeline.training.metrics import finite_or_none, print_line


class ProgressReporter:
    """Rank 0's progress lines, every ``every_s`` seconds (default: ``$RNNLM_PROGRESS_EVERY_S``; unset: none)."""

    def __init__(self, is_main: bool, every_s: float | None = None):
        if every_s is None:
            every_s = float(os.environ[EVERY_S_ENV]) if os.environ.get(EVERY_S_ENV) else None
        self.every_s = every_s if is_main else None
        self.epoch: int | None = None
        self.loss_sum: torch.Tensor | None = None
        self.steps = self.tokens = 0
        self.since = self.last_line = time.perf_counter()  # the window's start; the last line printed

    def step(self, run, loss: torch.Tensor, tokens: int) -> None:
        """Count one step of ``tokens`` tokens (global) and its loss; print a line when one is due."""
        if self.every_s is None:
            return
        if run.epoch != self.epoch:  # a new epoch (validation and a checkpoint since): start the window here
            self.epoch, self.loss_sum, self.steps, self.tokens, self.since = run.epoch, None, 0, 0, time.perf_counter()
            return
        loss = loss.detach().float()  # a CUDA graph rewrites its loss tensor: never keep it
        self.loss_sum = loss.clone() if self.loss_sum is None else self.loss_sum + loss
        self.steps += 1
        self.tokens += tokens
        now = time.perf_counter()
        if now - self.last_line < self.every_s:  # epochs shorter than every_s still get their lines
            return
        cfg = run.cfg
        print_line(json.dumps({
            "event": "progress", "stage": "train", "epoch": run.epoch + 1, "epochs": cfg.epochs,
            "step": run.step - run.epoch * run.steps_per_epoch, "steps_per_epoch": run.steps_per_epoch,
            "loss": finite_or_none(self.loss_sum.item() / self.steps),  # the one host sync per line
            "tokens_per_s": self.tokens / (now - self.since), "val_ppl": finite_or_none(run.val_ppl),
            "elapsed_s": run.elapsed(), "max_minutes": cfg.max_minutes}))
        self.loss_sum, self.steps, self.tokens, self.since, self.last_line = None, 0, 0, now, now
