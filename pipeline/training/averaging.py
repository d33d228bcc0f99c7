"""Non-monotonically triggered averaging: the "NT-A" of AWD-LSTM's NT-ASGD (Merity et al. 2017).

Train with plain SGD; at each evaluation (an epoch's end, or every ``train.eval_every_steps``
steps), ``observe`` the validation perplexity. Once it is worse than the best of all but the
last ``window`` evaluations (the trigger), every later
optimizer step also folds the weights into a running average, which is what validation,
the checkpoints and the shipped model use from then on. That is ``torch.optim.ASGD(t0=0,
lambd=0)`` started at the trigger, as in AWD-LSTM's training script, but kept apart from
the optimizer (``torch.optim.swa_utils.AveragedModel``): the optimizer and its checkpointed
state never change class mid-run, and the averaging works under any optimizer.

Every rank sees the same validation figure (broadcast) and holds the same weights, so all
ranks trigger at the same step and hold the same average; ``state_dict`` has all of it
(history, trigger epoch, running average and its count) for exact resume.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim.swa_utils import AveragedModel


class NTAverage:
    """The trigger and the running average of ``model``'s weights after it fires."""

    def __init__(self, model: nn.Module, window: int):
        if window < 1:
            raise ValueError(f"the NT-ASGD window must be at least 1 evaluation, got {window}")
        self.model, self.window = model, window
        self.history: list[float] = []  # validation perplexity of every evaluation so far
        self.triggered_at: int | None = None  # evaluations done when averaging started
        self.average: AveragedModel | None = None

    @property
    def active(self) -> bool:
        return self.average is not None

    def observe(self, val_ppl: float) -> bool:
        """Record an evaluation's validation perplexity; True when this one starts the averaging."""
        fires = (not self.active and len(self.history) > self.window
                 and val_ppl > min(self.history[: -self.window]))
        self.history.append(val_ppl)
        if fires:
            self.triggered_at = len(self.history)
            self.average = self._new_average()
        return fires

    def update(self) -> None:
        """After an optimizer step: fold the new weights into the average (once it runs)."""
        if self.average is not None:
            self.average.update_parameters(self.model)

    def evaluated_model(self) -> nn.Module:
        """The model to validate, checkpoint as "best" and ship: the average once it runs.

        Before its first update the average is the current weights (AveragedModel copies
        them at the first update), so the raw model stands in until then.
        """
        if self.average is None or int(self.average.n_averaged) == 0:
            return self.model
        return self.average.module

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "history": list(self.history), "triggered_at": self.triggered_at,
                "average": None if self.average is None else
                {k: v.detach().cpu().clone() for k, v in self.average.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [float(v) for v in state["history"]]
        self.triggered_at = state["triggered_at"]
        self.average = None
        if state["average"] is not None:
            self.average = self._new_average()
            self.average.load_state_dict(state["average"])

    def _new_average(self) -> AveragedModel:
        # A deep copy of the model on the same device; its first update copies the weights.
        return AveragedModel(self.model)
