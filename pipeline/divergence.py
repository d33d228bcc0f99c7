"""Noticing that training diverged: a non-finite gradient norm, loss or perplexity stops the run.

A loss can grow without ever being NaN (``sgd``, a huge ``lr``, no clipping): once
its perplexity overflows a float it is divergence too, the same verdict as NaN. A
diverged run raises ``NonFiniteLossError`` (do not retry): no checkpoint is written
past the last good step, no model is shipped, and FAILED.json says why.
"""

from __future__ import annotations

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
    """Raises NonFiniteLossError at the first step whose gradient norm is NaN or inf.

    On CPU the check is immediate. On a GPU each step's flag is copied to pinned
    host memory asynchronously and read one step later, so the GPU queue never
    drains; ``flush()`` (before every checkpoint) waits for the last one.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.host = torch.ones(2, dtype=torch.bool, pin_memory=True)
            self.events = [torch.cuda.Event(), torch.cuda.Event()]
        self.pending: tuple[int, int] | None = None  # (slot, step) not yet read

    def push(self, norm: torch.Tensor, step: int) -> None:
        if not self.cuda:
            if not torch.isfinite(norm):
                raise non_finite(step)
            return
        slot = step % 2
        self.host[slot].copy_(torch.isfinite(norm), non_blocking=True)
        self.events[slot].record()
        previous, self.pending = self.pending, (slot, step)
        if previous is not None:
            self._read(*previous)

    def flush(self) -> None:
        if self.pending is not None:
            previous, self.pending = self.pending, None
            self._read(*previous)

    def _read(self, slot: int, step: int) -> None:
        self.events[slot].synchronize()
        if not self.host[slot]:
            raise non_finite(step)
