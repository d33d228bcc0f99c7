"""Non-monotonically triggered averaging (the averaging half of NT-ASGD)."""

from __future__ import annotations

import pytest
import torch

from pipeline.training.averaging import NTAverage
from pipeline.config import ModelConfig
from pipeline.model.models import build_model

torch.set_num_threads(1)


def small_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(hidden_size=4, embed_size=3, weight_drop=0.3), 7)


def test_triggers_when_worse_than_the_best_before_the_window():
    # AWD-LSTM: fire once val > min(all but the last `window` epochs), checked before appending.
    averager = NTAverage(small_model(), window=2)
    fired = [averager.observe(v) for v in [5.0, 4.0, 3.0, 3.5, 3.2, 2.9, 3.1, 9.0]]
    assert fired == [False, False, False, False, False, False, True, False]
    assert averager.triggered_at == 7 and averager.active


def test_never_triggers_while_improving():
    averager = NTAverage(small_model(), window=1)
    assert not any(averager.observe(v) for v in [9.0, 8.0, 7.0, 6.0, 5.0])
    assert averager.evaluated_model() is averager.model


def test_average_of_the_iterates_after_the_trigger():
    model = small_model()
    averager = NTAverage(model, window=1)
    averager.update()  # not yet triggered: nothing happens
    for v in [3.0, 2.0, 2.5, 3.5]:
        averager.observe(v)
    assert averager.active and averager.evaluated_model() is model  # nothing averaged yet
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for _ in range(4):  # iterates start + 1, ..., start + 4: their mean is start + 2.5
            for p in model.parameters():
                p.add_(1.0)
            averager.update()
    averaged = averager.evaluated_model()
    assert averaged is not model
    for name, value in averaged.state_dict().items():
        torch.testing.assert_close(value, start[name] + 2.5, msg=name)
    assert set(averaged.state_dict()) == set(model.state_dict())  # ships like the model itself


def test_state_dict_round_trip_resumes_exactly():
    model = small_model()
    averager = NTAverage(model, window=1)
    for v in [3.0, 2.0, 2.5, 3.5]:
        averager.observe(v)
    with torch.no_grad():
        for step in range(3):
            for p in model.parameters():
                p.mul_(1.1).add_(step)
            averager.update()
    state = averager.state_dict()
    resumed = NTAverage(model, window=1)
    resumed.load_state_dict(state)
    for a in (averager, resumed):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        a.update()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.5)
    for (name, x), y in zip(averager.evaluated_model().state_dict().items(),
                            resumed.evaluated_model().state_dict().values()):
        assert torch.equal(x, y), name
    assert resumed.history == averager.history and resumed.triggered_at == 4
    fresh = NTAverage(model, window=1)
    fresh.load_state_dict(NTAverage(model, window=1).state_dict())
    assert not fresh.active


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window"):
        NTAverage(small_model(), window=0)
