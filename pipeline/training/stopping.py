"""Early stopping: stop after ``patience`` evaluations without a better validation perplexity.

An evaluation is an epoch's end, or every ``train.eval_every_steps`` steps when that is set.

The trainer keeps the best epoch's weights already (``train.keep_best``); this only ends
the run when waiting longer is unlikely to beat them. Every rank feeds it the same
(broadcast) figure, so all ranks stop at the same step; its state is checkpointed.
"""

from __future__ import annotations

import math
from typing import Any


class EarlyStopping:
    """Counts evaluations since the best validation perplexity; ``patience=None`` never stops."""

    def __init__(self, patience: int | None):
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be at least 1 evaluation, got {patience}")
        self.patience = patience
        self.best = math.inf
        self.bad_epochs = 0  # evaluations without improvement (the checkpointed name)

    def update(self, val_ppl: float) -> bool:
        """Record an evaluation's validation perplexity; True when training should stop now."""
        if math.isnan(val_ppl):  # no validation split: nothing to judge by
            return False
        if val_ppl < self.best:
            self.best, self.bad_epochs = val_ppl, 0
        else:
            self.bad_epochs += 1
        return self.exhausted

    @property
    def exhausted(self) -> bool:
        """Patience has run out (also right after resuming a run that early stopping ended)."""
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])
