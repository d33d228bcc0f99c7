"""AWD-LSTM regularisers: locked and embedding dropout, weight drop, AR/TAR; in the model for both backends."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from pipeline.config import ModelConfig
from pipeline.model.models import build_model
from pipeline.model.regularization import activation_penalty, drop_weight, embedding_dropout, locked_dropout

torch.set_num_threads(1)

V, H, E, L, B, T = 13, 8, 6, 2, 4, 9
CELLS = ["rnn", "gru", "lstm"]
ALL_ON = dict(dropout_input=0.3, dropout_between=0.4, dropout_output=0.5, dropout_embedding=0.2, weight_drop=0.5)


def cfg(**overrides) -> ModelConfig:
    base = dict(cell="lstm", hidden_size=H, num_layers=L, embed_size=E, init="uniform", init_scale=0.5)
    return ModelConfig(**{**base, **overrides})


def model_pair(cell, **overrides):
    """A scratch and a torch model holding the same weights (float64)."""
    torch.manual_seed(0)
    scratch = build_model(cfg(cell=cell, backend="scratch", **overrides), V).double()
    reference = build_model(cfg(cell=cell, backend="torch", **overrides), V).double()
    reference.load_state_dict(scratch.state_dict())
    return scratch, reference


def test_locked_dropout_shares_one_mask_across_time():
    torch.manual_seed(0)
    x = torch.rand(T, B, 50) + 0.5  # time-major, as inside the model
    out = locked_dropout(x, 0.4, training=True)
    mask = out / x
    torch.testing.assert_close(mask, mask[:1].expand_as(mask))  # every step: the first step's mask
    assert torch.all((mask == 0) | torch.isclose(mask, torch.tensor(1 / 0.6)))
    assert not torch.all(mask[0, 0] == mask[0, 1])  # but each sequence has its own
    assert 0.25 < (mask == 0).float().mean() < 0.55
    state = torch.get_rng_state()
    assert locked_dropout(x, 0.4, training=False) is x
    assert locked_dropout(x, 0.0, training=True) is x
    assert torch.equal(torch.get_rng_state(), state)  # eval mode draws nothing


def test_embedding_dropout_drops_whole_words():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(V, 20)
    with torch.no_grad():
        embedding.weight.uniform_(0.5, 1.5)
    ids = torch.arange(V).repeat(B, 3)  # every word occurs 3 times in each row
    out = embedding_dropout(embedding, ids, 0.5, training=True)
    zero_rows = (out == 0).all(dim=-1)
    assert torch.equal(zero_rows, (out == 0).any(dim=-1))  # a vector is dropped whole or not at all
    dropped_words = set(ids[zero_rows].tolist())
    assert 0 < len(dropped_words) < V
    assert not set(ids[~zero_rows].tolist()) & dropped_words  # a dropped word is dropped everywhere
    kept = ~zero_rows
    torch.testing.assert_close(out[kept], embedding(ids)[kept] / 0.5)
    assert torch.equal(embedding_dropout(embedding, ids, 0.5, training=False), embedding(ids))


def test_drop_weight_returns_a_dropped_copy():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.rand(30, 30) + 0.5)
    before = w.detach().clone()
    dropped = drop_weight(w, 0.5, training=True)
    assert torch.equal(w, before)
    zeros = dropped == 0
    assert 0.35 < zeros.float().mean() < 0.65
    torch.testing.assert_close(dropped[~zeros], w[~zeros] * 2)
    dropped.sum().backward()
    assert torch.equal(w.grad, (~zeros).float() * 2)  # gradient reaches the kept entries only
    assert drop_weight(w, 0.5, training=False) is w


def test_activation_penalty():
    g = torch.Generator().manual_seed(0)
    raw, dropped = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    ar = (dropped ** 2).mean()
    tar = ((raw[:, 1:] - raw[:, :-1]) ** 2).mean()
    torch.testing.assert_close(activation_penalty(raw, dropped, 2.0, 0.0), 2 * ar)
    torch.testing.assert_close(activation_penalty(raw, dropped, 0.0, 1.0), tar)
    torch.testing.assert_close(activation_penalty(raw, dropped, 2.0, 1.0), 2 * ar + tar)
    assert activation_penalty(raw, dropped, 0.0, 0.0).item() == 0.0


@pytest.mark.parametrize("cell", CELLS)
def test_backends_agree_in_training_with_every_regulariser(cell):
    # Same seed -> same masks in the same order -> same logits, states and gradients.
    scratch, reference = model_pair(cell, **ALL_ON)
    X = torch.randint(0, V, (B, T))
    results = []
    for model in (scratch, reference):
        model.train()
        torch.manual_seed(7)
        logits, state, (raw, dropped) = model(X, with_activations=True)
        (logits.sum() + activation_penalty(raw, dropped, 1.0, 1.0)).backward()
        results.append((logits, state, {n: p.grad for n, p in model.named_parameters()}))
    (logits_s, state_s, grads_s), (logits_t, state_t, grads_t) = results
    torch.testing.assert_close(logits_s, logits_t, atol=1e-10, rtol=0)
    for s, t in zip(state_s, state_t):
        torch.testing.assert_close(s, t, atol=1e-10, rtol=0)
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_t[name], atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("backend", ["torch", "scratch"])
@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_uses_one_dropped_matrix_for_every_step(backend, cell):
    # Train mode with weight drop == eval mode of a copy whose hidden-to-hidden weights are
    # the dropped matrices, drawn in the same order (layer 0, then layer 1).
    torch.manual_seed(0)
    model = build_model(cfg(cell=cell, backend=backend, weight_drop=0.5), V).double().train()
    X = torch.randint(0, V, (B, T))
    torch.manual_seed(3)
    logits, state = model(X)
    torch.manual_seed(3)
    dropped = {f"rnn.weight_hh_l{k}": F.dropout(getattr(model.rnn, f"weight_hh_l{k}"), 0.5) for k in range(L)}
    assert all(0.2 < (w == 0).float().mean() < 0.8 for w in dropped.values())
    twin = build_model(cfg(cell=cell, backend=backend), V).double().eval()
    twin.load_state_dict({**model.state_dict(), **{k: w.detach() for k, w in dropped.items()}})
    expected_logits, expected_state = twin(X)
    torch.testing.assert_close(logits, expected_logits, atol=1e-12, rtol=0)
    for s, e in zip(state, expected_state):
        torch.testing.assert_close(s, e, atol=1e-12, rtol=0)
    assert model.rnn.weight_hh_l0.count_nonzero() == model.rnn.weight_hh_l0.numel()  # parameter untouched


@pytest.mark.parametrize("backend", ["torch", "scratch"])
def test_locked_dropout_masks_in_the_model(backend):
    torch.manual_seed(0)
    model = build_model(cfg(backend=backend, dropout_output=0.5), V).train()
    _, _, (raw, dropped) = model(torch.randint(0, V, (B, T)), with_activations=True)
    zeros = dropped == 0
    assert zeros.any() and torch.all(zeros[:, :1] == zeros)  # the same units dropped at every step
    torch.testing.assert_close(dropped[~zeros], 2 * raw[~zeros])


@pytest.mark.parametrize("backend", ["torch", "scratch"])
@pytest.mark.parametrize("cell", CELLS)
def test_identity_in_eval_mode(backend, cell):
    torch.manual_seed(0)
    regularised = build_model(cfg(cell=cell, backend=backend, **ALL_ON), V).eval()
    plain = build_model(cfg(cell=cell, backend=backend), V).eval()
    plain.load_state_dict(regularised.state_dict())
    X = torch.randint(0, V, (B, T))
    rng = torch.get_rng_state()
    with torch.no_grad():
        torch.testing.assert_close(regularised(X)[0], plain(X)[0], atol=0, rtol=0)
    assert torch.equal(torch.get_rng_state(), rng)
    regularised.train()
    with torch.no_grad():
        assert not torch.allclose(regularised(X)[0], plain(X)[0])


@pytest.mark.parametrize("backend", ["torch", "scratch"])
def test_masks_follow_the_seed(backend):
    torch.manual_seed(0)
    model = build_model(cfg(backend=backend, **ALL_ON), V).train()
    X = torch.randint(0, V, (B, T))

    def run(seed):
        torch.manual_seed(seed)
        return model(X)[0]

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_state_dict_is_the_same_with_and_without_regularisers():
    names = set(build_model(cfg(), V).state_dict())
    assert set(build_model(cfg(**ALL_ON), V).state_dict()) == names
    assert set(build_model(cfg(backend="scratch", **ALL_ON), V).state_dict()) == names


def test_config_rejects_two_kinds_of_dropout_at_one_place():
    with pytest.raises(ValidationError, match="set one kind"):
        cfg(dropout=0.2, dropout_output=0.3)
    with pytest.raises(ValidationError):
        cfg(weight_drop=1.0)
    cfg(dropout=0.2, weight_drop=0.3, dropout_input=0.1, dropout_embedding=0.1)  # these combine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN needs a GPU")
@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_on_cudnn_flattens_without_warnings(cell):
    torch.manual_seed(0)
    reference = build_model(cfg(cell=cell, backend="scratch", **ALL_ON), V).cuda().train()
    model = build_model(cfg(cell=cell, **ALL_ON), V).cuda().train()
    model.load_state_dict(reference.state_dict())
    X = torch.randint(0, V, (B, T), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "weights are not part of single contiguous chunk" fails
        for _ in range(3):
            torch.manual_seed(5)
            logits, _ = model(X)
            logits.sum().backward()
        torch.manual_seed(5)
        expected, _ = reference(X)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        model.eval()
        with torch.no_grad():
            model(X)


@pytest.mark.parametrize("mode", ["locked", "per_step"])
def test_input_dropout_masks_per_sequence_or_per_time_step(mode):
    """ptb-word-medium drops the embeddings' output with a fresh mask at every time step, as
    Zaremba et al. do; AWD-LSTM locks one mask per sequence."""
    model = build_model(cfg(cell="lstm", embed_size=64, dropout_input=0.5, dropout_input_mode=mode), V).train()
    seen = {}
    model.rnn.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    torch.manual_seed(0)
    model(torch.full((B, T), 3))  # one word at every step: its embedding is the same everywhere
    x = seen["x"]  # (T, B, E), what the stack received
    kept = x != 0
    across_time = torch.equal(kept, kept[:1].expand_as(kept))
    assert across_time == (mode == "locked")
    assert 0.3 < (~kept).float().mean() < 0.7
    model.eval()
    seen.clear()
    model(torch.full((B, T), 3))
    assert (seen["x"] != 0).all()  # no dropout in eval mode


def test_per_step_input_dropout_needs_a_rate():
    with pytest.raises(ValidationError, match="dropout_input_mode='per_step' needs dropout_input > 0"):
        cfg(dropout_input_mode="per_step")


def test_the_ptb_medium_presets_are_the_papers_model():
    from pipeline.config_sources import load_run_config

    medium, tied = load_run_config("ptb-word-medium").model, load_run_config("ptb-word-medium-tied").model
    assert (medium.dropout, medium.dropout_input, medium.dropout_input_mode) == (0.5, 0.5, "per_step")
    assert not medium.tie_weights and tied.tie_weights
    assert tied.model_copy(update={"tie_weights": False}) == medium
