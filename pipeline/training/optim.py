"""The optimizer, its learning-rate schedule, and gradient clipping by global norm."""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.config import TrainConfig


def clip_grad_norm_(parameters: list[torch.nn.Parameter], theta: float | None) -> torch.Tensor:
    """d2l's clipping by global L2 norm, in place: g <- min(1, theta / ||g||) * g.

    Returns ||g|| before clipping, as a tensor (no host sync). Scaling by
    ``min(1, theta/||g||)`` unconditionally (1.0 is exact) avoids an
    ``if norm > theta`` branch, which would stall a GPU every step.
    ``theta=None`` only measures.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if theta is not None:
        torch._foreach_mul_(grads, torch.clamp(theta / norm, max=1.0))
    return norm


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``nt_asgd`` is SGD here: its averaging is ``pipeline.training.averaging.NTAverage``, beside the optimizer."""
    if cfg.optimizer in ("sgd", "nt_asgd"):
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    # A CUDA graph replays the update: Adam's step count must then live on the device.
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, capturable=cfg.cuda_graphs)


class LRSchedule:
    """The learning rate, set on the optimizer; its state is checkpointed.

    * ``constant``: ``cfg.lr`` throughout.
    * ``decay``: epoch ``n`` (1-based) trains at ``lr * lr_decay ** max(0, n - lr_decay_after)``
      (the classic PTB recipe: ``lr_decay_after`` epochs at full rate, then geometric).
    * ``plateau``: multiply by ``lr_decay`` once validation perplexity has not improved
      for ``lr_patience`` evaluations in a row (0 counts as 1); an evaluation is an epoch's
      end unless ``eval_every_steps`` is set.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.optimizer, self.cfg = optimizer, cfg
        self.lr = self._decayed(1) if cfg.lr_schedule == "decay" else cfg.lr
        self.best, self.bad_epochs = math.inf, 0  # "bad_epochs": bad evaluations (the checkpointed name)
        self._apply()

    def _decayed(self, epoch: int) -> float:
        return self.cfg.lr * self.cfg.lr_decay ** max(0, epoch - self.cfg.lr_decay_after)

    def step(self, epochs_done: int, val_ppl: float) -> None:
        """An epoch's end that is also its evaluation (the default): ``end_epoch`` and ``evaluated``."""
        self.end_epoch(epochs_done)
        self.evaluated(val_ppl)

    def end_epoch(self, epochs_done: int) -> None:
        """After each epoch: ``decay`` sets the rate for the next one."""
        if self.cfg.lr_schedule == "decay":
            self.lr = self._decayed(epochs_done + 1)
            self._apply()

    def evaluated(self, val_ppl: float) -> None:
        """After each evaluation: ``plateau`` counts it."""
        if self.cfg.lr_schedule == "plateau":
            if val_ppl < self.best:
                self.best, self.bad_epochs = val_ppl, 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs >= max(1, self.cfg.lr_patience):
                    self.lr, self.bad_epochs = self.lr * self.cfg.lr_decay, 0
        self._apply()

    def scale_batch(self, factor: float) -> None:
        """The rate for the next step only: ``lr * factor`` (variable BPTT: length / num_steps)."""
        self._apply(factor)

    def _apply(self, factor: float = 1.0) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * factor

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.best, self.bad_epochs = float(state["lr"]), float(state["best"]), int(state["bad_epochs"])
        self._apply()
