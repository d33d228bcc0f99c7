import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.model.evaluate import mean_cross_entropy, perplexity
from pipeline.model.models import build_model

torch.set_num_threads(1)

V = 13


def random_model(cell="gru", backend="torch"):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, backend=backend, hidden_size=8, num_layers=2, embed_size=6,
                      init="uniform", init_scale=0.5)
    return build_model(cfg, V).double()


def random_ids(n, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=n)


def naive_sum_ce(model, ids):
    """Summed cross-entropy of one stream, fed in a single call from the zero state."""
    with torch.no_grad():
        x = torch.from_numpy(ids[:-1]).long()[None]
        y = torch.from_numpy(ids[1:]).long()
        logits, _ = model.eval()(x)
        return F.cross_entropy(logits[0], y, reduction="sum").item()


def test_uniform_logits_score_the_vocabulary_size():
    model = random_model()
    with torch.no_grad():
        model.output.weight.zero_()
        model.output.bias.zero_()
    ids = random_ids(23)
    for batch_size, num_steps in [(1, 5), (4, 3), (32, 35)]:
        ppl = perplexity(model, ids, batch_size=batch_size, num_steps=num_steps)
        assert ppl == pytest.approx(V, rel=1e-5)


@pytest.mark.parametrize("num_steps", [1, 4, 50])
def test_batch_one_equals_one_pass_over_the_whole_split(num_steps):
    model = random_model()
    ids = random_ids(41)
    expected = naive_sum_ce(model, ids) / 40
    got = mean_cross_entropy(model, ids, batch_size=1, num_steps=num_steps)
    assert got == pytest.approx(expected, rel=1e-9)
    assert perplexity(model, ids, batch_size=1, num_steps=num_steps) == pytest.approx(
        math.exp(expected), rel=1e-9)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_every_target_counted_with_leftovers(cell):
    # 30 targets in 4 streams of 7, plus 2 leftover targets that continue the last stream.
    model = random_model(cell)
    ids = random_ids(31, seed=1)
    streams = [ids[0:8], ids[7:15], ids[14:22], ids[21:31]]
    assert sum(len(s) - 1 for s in streams) == 30
    expected = sum(naive_sum_ce(model, s) for s in streams) / 30
    for num_steps in (3, 7, 100):
        got = mean_cross_entropy(model, ids, batch_size=4, num_steps=num_steps)
        assert got == pytest.approx(expected, rel=1e-9)
    # Dropping the leftovers would give a different value.
    assert sum(naive_sum_ce(model, s) for s in streams[:3] + [ids[21:29]]) / 28 != pytest.approx(
        expected, rel=1e-6)


def test_more_streams_than_targets():
    model = random_model()
    ids = random_ids(4)
    expected = sum(naive_sum_ce(model, ids[i:i + 2]) for i in range(3)) / 3
    assert mean_cross_entropy(model, ids, batch_size=32, num_steps=35) == pytest.approx(expected, rel=1e-9)


def test_float32_model_matches_naive_loop():
    model = random_model().float()
    ids = random_ids(50, seed=2)
    expected = math.exp(naive_sum_ce(model, ids) / 49)
    assert perplexity(model, ids, batch_size=1, num_steps=6) == pytest.approx(expected, rel=1e-5)


def test_state_is_carried_between_windows():
    model = random_model()
    ids = random_ids(41, seed=3)
    carried = mean_cross_entropy(model, ids, batch_size=1, num_steps=5)
    assert carried == pytest.approx(naive_sum_ce(model, ids) / 40, rel=1e-9)
    # The same windows, each from a fresh zero state, score differently.
    reset = sum(naive_sum_ce(model, ids[i:i + 6]) for i in range(0, 40, 5)) / 40
    assert abs(carried - reset) > 1e-3


def test_restores_train_mode_and_uses_eval_mode():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=8, num_layers=2, embed_size=6, dropout=0.5)
    model = build_model(cfg, V).double().train()
    ids = random_ids(30)
    a = perplexity(model, ids, batch_size=2, num_steps=4)
    b = perplexity(model, ids, batch_size=2, num_steps=4)
    assert a == b  # no dropout noise
    assert model.training
    model.eval()
    assert perplexity(model, ids, batch_size=2, num_steps=4) == a
    assert not model.training


def test_input_validation():
    model = random_model()
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, np.array([3]))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, np.zeros((2, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        perplexity(model, np.zeros(5))
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        perplexity(model, np.array([1, 2, 13]))
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, np.array([1, 2, 3]), batch_size=0)
