"""Noticing that training diverged: a non-finite gradient norm, loss or perplexity stops the run.

A loss can grow without ever being NaN (``sgd``, a huge ``lr``, no clipping): once
its perplexity overflows a float it is divergence too, the same verdict as NaN. A
diverged run raises ``NonFiniteLossError`` (do not retry): no checkpoint is written
past the last good step, no model is shipped, and FAILED.json says why.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from pipeline.errors import NonFiniteLossError


def non_finite(step: int, what: str = "loss/gradient") -> NonFiniteLossError:
    err = NonFiniteLossError(f"non-finite {what} at step {step}: training diverged (lower lr, set clip_norm)")
    err.step = step
    return err


def with_checkpoint_note(err: NonFiniteLossError, last_checkpoint: str | None) -> NonFiniteLossError:
    """Say what a diverged run leaves behind: its newest checkpoint is kept, or there is none."""
    kept = f"the last good checkpoint is kept ({last_checkpoint})" if last_checkpoint else "no checkpoint yet"
    err.args = (f"{err.args[0]}; {kept}",)
    return err


class FiniteWatch:
    """Raises NonFiniteLossError at the first step whose watched value is NaN or inf (the trainer
    watches the running sum of the gradient norms, or under fp16 of the losses: a sum of
    non-negative norms turns non-finite at the first non-finite one and stays so).

    On CPU the check is immediate. On a GPU each step's value is copied to pinned host memory
    asynchronously and read ``lag`` steps later, so the host runs up to ``lag`` steps ahead of
    the device and the queue never drains; the error still names the step that diverged.
    ``flush()`` (before every checkpoint and at the end of the epoch) reads every pending value,
    so bad weights never reach a checkpoint. ``deferred=True`` runs the lagged bookkeeping on a
    CPU too (tests guard the GPU's logic with it).
    """

    def __init__(self, device: torch.device, lag: int = 4, deferred: bool | None = None):
        cuda = device.type == "cuda"
        self.deferred = cuda if deferred is None else deferred
        self.lag = lag
        if self.deferred:
            self.host = torch.zeros(lag, dtype=torch.float64, pin_memory=cuda)
            self.events = [torch.cuda.Event() for _ in range(lag)] if cuda else None
        self.pending: deque[tuple[int, int]] = deque()  # (slot, step), oldest first
        self.pushed = 0

    def push(self, value: torch.Tensor, step: int) -> None:
        if not self.deferred:
            if not math.isfinite(value.item()):
                raise non_finite(step)
            return
        if len(self.pending) == self.lag:  # the oldest slot is about to be reused: read it
            self._read(*self.pending.popleft())
        slot = self.pushed % self.lag
        self.pushed += 1
        self.host[slot].copy_(value.detach(), non_blocking=True)
        if self.events:
            self.events[slot].record()
        self.pending.append((slot, step))

    def flush(self) -> None:
        while self.pending:
            self._read(*self.pending.popleft())

    def _read(self, slot: int, step: int) -> None:
        if self.events:
            self.events[slot].synchronize()
        if not math.isfinite(self.host[slot].item()):
            self.pending.clear()
            raise non_finite(step)
