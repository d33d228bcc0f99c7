"""Mixed precision for the training step (``train.precision``, ``train.tf32``).

``fp32`` changes nothing. ``bf16`` and ``fp16`` run the step under ``torch.autocast``
(on CPU as on CUDA), with two exceptions the model makes itself (``pipeline.model.models``):
the recurrence runs in fp32, because its state is an accumulator carried across every
step and window, and the log-softmax of the loss runs in fp32. ``fp16`` adds a gradient
scaler: the loss is scaled up before backward so small gradients survive fp16, the
gradients are unscaled before clipping (clipping sees true norms), and a step whose
gradients overflowed is skipped while the scale backs off. Such a step is not a failure;
a non-finite *loss* is.

``tf32`` lets CUDA fp32 matmuls (and cuDNN's recurrent kernels) use TF32 tensor cores.

    mp = MixedPrecision(cfg.precision, device)
    with mp.autocast():
        loss, state = model(X, state, targets=Y)
    mp.backward(loss)
    mp.unscale_(optimizer)            # before clipping
    norm = clip_grad_norm_(params, theta)
    mp.step(optimizer)                # skipped (fp16) when the gradients overflowed
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from pipeline.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def set_matmul_precision(tf32: bool, device: torch.device) -> None:
    """TF32 for fp32 matmuls and cuDNN on CUDA when ``tf32``; CPU matmuls stay exact fp32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


class MixedPrecision:
    """The autocast context and, for fp16, the gradient scaler of one training run."""

    def __init__(self, precision: str, device: torch.device, *, graphs: bool = False):
        if precision not in ("fp32", *DTYPES):
            raise ConfigError(f"train.precision must be fp32, bf16 or fp16, got {precision!r}")
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.precision is 'bf16' but {torch.cuda.get_device_name(device)} "
                              f"has no bf16 support: use fp16")
        self.precision, self.device = precision, device
        self.dtype = DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.cache = not graphs  # a captured graph must not keep autocast's cast weights from capture time

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=self.cache)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the current scale (in place): call before clipping."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step; under fp16 skipped when a gradient is inf/NaN, then the scale adapts."""
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (scale, growth tracker) for checkpoints: exact resume needs it."""
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)
