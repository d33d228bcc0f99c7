import io
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from pipeline.config import ModelConfig
from pipeline.model.models import RNNLM, build_model, detach_state

torch.set_num_threads(1)

V, H, E, L, B, T = 11, 6, 5, 2, 3, 7

CELLS = [
    pytest.param("rnn", "tanh", id="rnn-tanh"),
    pytest.param("rnn", "relu", id="rnn-relu"),
    pytest.param("gru", "tanh", id="gru"),
    pytest.param("lstm", "tanh", id="lstm"),
]


def cfg(**overrides) -> ModelConfig:
    base = dict(cell="gru", hidden_size=H, num_layers=L, embed_size=E, init="uniform", init_scale=0.5)
    return ModelConfig(**{**base, **overrides})


def pair(cell, nonlinearity, dtype=torch.float64):
    """A scratch model and a torch model holding the same weights."""
    torch.manual_seed(0)
    scratch = build_model(cfg(cell=cell, nonlinearity=nonlinearity, backend="scratch"), V).to(dtype)
    reference = build_model(cfg(cell=cell, nonlinearity=nonlinearity, backend="torch"), V).to(dtype)
    reference.load_state_dict(scratch.state_dict())
    return scratch, reference


@pytest.mark.parametrize("cell,nonlinearity", CELLS)
def test_scratch_matches_torch_outputs_states_and_gradients(cell, nonlinearity):
    scratch, reference = pair(cell, nonlinearity)
    assert scratch.state_dict().keys() == reference.state_dict().keys()
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, V, (B, T), generator=g)
    state0 = tuple(0.5 * torch.randn(L, B, H, generator=g, dtype=torch.float64)
                   for _ in range(2 if cell == "lstm" else 1))
    weights = torch.randn(B, T, V, generator=g, dtype=torch.float64)  # a loss that uses every logit

    results = []
    for model in (scratch, reference):
        model.zero_grad()
        logits, state = model(X, state0)
        loss = (logits * weights).sum() + sum(s.pow(2).sum() for s in state)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((logits, state, grads))

    (logits_s, state_s, grads_s), (logits_t, state_t, grads_t) = results
    assert logits_s.shape == (B, T, V)
    assert logits_s.abs().max() > 0.1  # not a trivially tiny model
    torch.testing.assert_close(logits_s, logits_t, atol=1e-5, rtol=0)
    assert len(state_s) == len(state_t)
    for s, t in zip(state_s, state_t):
        torch.testing.assert_close(s, t, atol=1e-5, rtol=0)
    assert grads_s.keys() == grads_t.keys()
    for name in grads_s:
        assert grads_s[name].abs().max() > 0, name
        torch.testing.assert_close(grads_s[name], grads_t[name], atol=1e-5, rtol=0, msg=name)


def test_scratch_trained_model_serves_as_torch_backend():
    torch.manual_seed(0)
    scratch = build_model(cfg(cell="lstm", backend="scratch", dropout=0.2), V)
    opt = torch.optim.SGD(scratch.parameters(), lr=0.5)
    X = torch.randint(0, V, (B, T + 1))
    before = {n: p.detach().clone() for n, p in scratch.named_parameters()}
    for _ in range(3):
        logits, _ = scratch(X[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), X[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(before[n], p) for n, p in scratch.named_parameters())

    buffer = io.BytesIO()
    torch.save(scratch.state_dict(), buffer)
    buffer.seek(0)
    served = build_model(cfg(cell="lstm", backend="torch", dropout=0.2), V)
    served.load_state_dict(torch.load(buffer))
    scratch.eval()
    served.eval()
    with torch.no_grad():
        torch.testing.assert_close(served(X)[0], scratch(X)[0], atol=1e-5, rtol=1e-5)


def test_one_hot_times_weight_is_embedding_lookup():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(V, E, generator=g, dtype=torch.float64)
    X = torch.randint(0, V, (B, T), generator=g)
    upstream = torch.randn(B, T, E, generator=g, dtype=torch.float64)

    W1 = W.clone().requires_grad_()
    via_one_hot = F.one_hot(X, V).double() @ W1
    (via_one_hot * upstream).sum().backward()

    embedding = torch.nn.Embedding(V, E).double()
    with torch.no_grad():
        embedding.weight.copy_(W)
    via_lookup = embedding(X)
    (via_lookup * upstream).sum().backward()

    torch.testing.assert_close(via_one_hot, via_lookup, atol=1e-12, rtol=0)
    torch.testing.assert_close(W1.grad, embedding.weight.grad, atol=1e-12, rtol=0)
    # Rows of tokens that never occur get no gradient.
    unused = sorted(set(range(V)) - set(X.flatten().tolist()))
    assert torch.all(embedding.weight.grad[unused] == 0)


def test_embedding_defaults_to_one_hot_width():
    model = build_model(ModelConfig(hidden_size=H), V)
    assert model.embedding.weight.shape == (V, V)
    assert model.rnn.weight_ih_l0.shape == (3 * H, V)


@pytest.mark.parametrize("backend", ["torch", "scratch"])
@pytest.mark.parametrize("init", ["normal", "uniform", "default"])
def test_default_input_is_d2ls_one_hot_and_stays_so(backend, init):
    """embed_size null is d2l's model: one-hot inputs straight into W_xh, no learned V x V matrix in front."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backend=backend, cell="gru", hidden_size=H, init=init), V)
    X = torch.randint(0, V, (B, T))
    torch.testing.assert_close(model.embedding(X), F.one_hot(X, V).float(), atol=0, rtol=0)

    # d2l.RNNModel (sec. 9.6): one-hot input, the recurrent layer, a linear head; same weights.
    rnn = torch.nn.GRU(V, H)
    rnn.load_state_dict({k.removeprefix("rnn."): v for k, v in model.state_dict().items() if k.startswith("rnn.")})
    out, _ = rnn(F.one_hot(X.T, V).float())
    d2l_logits = model.output(out).transpose(0, 1)
    torch.testing.assert_close(model(X)[0], d2l_logits, atol=1e-6, rtol=1e-5)

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(2):
        optimizer.zero_grad()
        model(X, targets=X)[0].backward()
        optimizer.step()
    assert model.embedding.weight.grad is None  # not trained: the input stays one-hot
    torch.testing.assert_close(model.embedding.weight, torch.eye(V), atol=0, rtol=0)
    assert model.rnn.weight_ih_l0.grad.abs().sum() > 0
    restored = build_model(ModelConfig(backend=backend, cell="gru", hidden_size=H, init=init), V)
    restored.load_state_dict(model.state_dict())  # the state_dict keeps the (identity) embedding
    torch.testing.assert_close(restored(X)[0], model(X)[0])

    # A model trained before the input was fixed (a learned V x V matrix there) loads and uses it.
    old = dict(model.state_dict(), **{"embedding.weight": torch.randn(V, V)})
    restored.load_state_dict(old)
    torch.testing.assert_close(restored.embedding(X), old["embedding.weight"][X], atol=0, rtol=0)


def test_an_explicit_embed_size_is_learned():
    model = build_model(ModelConfig(hidden_size=H, embed_size=V), V)
    assert model.embedding.weight.requires_grad
    assert not torch.equal(model.embedding.weight, torch.eye(V))


@pytest.mark.parametrize("backend", ["torch", "scratch"])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_shapes_and_state_conventions(backend, cell):
    model = build_model(cfg(cell=cell, backend=backend), V)
    X = torch.randint(0, V, (B, T))
    state = model.begin_state(B, "cpu")
    assert isinstance(state, tuple) and len(state) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (L, B, H) and torch.all(s == 0) for s in state)

    logits, new_state = model(X)
    assert logits.shape == (B, T, V)
    assert isinstance(new_state, tuple) and len(new_state) == len(state)
    assert all(s.shape == (L, B, H) for s in new_state)
    # state=None means zeros
    torch.testing.assert_close(model(X, state)[0], logits)
    # Carrying state over a split equals one long call.
    first, mid = model(X[:, :3])
    second, end = model(X[:, 3:], mid)
    torch.testing.assert_close(torch.cat([first, second], dim=1), logits, atol=1e-6, rtol=1e-5)
    for a, b in zip(end, new_state):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    detached = detach_state(new_state)
    assert all(new.requires_grad and not d.requires_grad for new, d in zip(new_state, detached))
    torch.testing.assert_close(detached, new_state)

    with pytest.raises(ValueError, match="state tensors must be shaped"):
        model(X, model.begin_state(B + 1, "cpu"))
    with pytest.raises(ValueError, match="batch, num_steps"):
        model(X[0])


@pytest.mark.parametrize("backend", ["torch", "scratch"])
def test_dropout_only_in_train_mode(backend):
    torch.manual_seed(0)
    X = torch.randint(0, V, (B, T))
    model = build_model(cfg(backend=backend, dropout=0.5), V)
    model.train()
    assert not torch.allclose(model(X)[0], model(X)[0])
    model.eval()
    torch.testing.assert_close(model(X)[0], model(X)[0], atol=0, rtol=0)

    no_dropout = build_model(cfg(backend=backend, dropout=0.0), V).train()
    torch.testing.assert_close(no_dropout(X)[0], no_dropout(X)[0], atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "scratch"])
def test_dropout_also_acts_between_layers(backend):
    # The output dropout alone cannot change the final hidden state; dropout between
    # layers changes the input of layer 2 and therefore its state.
    torch.manual_seed(0)
    model = build_model(cfg(backend=backend, dropout=0.5), V).train()
    X = torch.randint(0, V, (B, T))
    (h1,), (h2,) = model(X)[1], model(X)[1]
    torch.testing.assert_close(h1[0], h2[0], atol=0, rtol=0)  # layer 1 sees no dropout
    assert not torch.allclose(h1[1], h2[1])


def test_tie_weights_shares_one_tensor():
    model = build_model(ModelConfig(hidden_size=H, tie_weights=True), V)
    assert model.output.weight is model.embedding.weight
    assert model.embedding.weight.shape == (V, H)  # default embed dim when tied = hidden
    rnn_count = sum(p.numel() for p in model.rnn.parameters())
    assert sum(p.numel() for p in model.parameters()) == V * H + rnn_count + V  # output bias only
    with torch.no_grad():
        model.embedding.weight[3].fill_(7.0)
    assert torch.all(model.output.weight[3] == 7.0)
    with pytest.raises(ValueError, match="tie_weights"):
        RNNLM(ModelConfig(hidden_size=H, embed_size=H, tie_weights=True).model_copy(
            update={"embed_size": H + 1}), V)


@pytest.mark.parametrize("backend", ["torch", "scratch"])
def test_normal_init(backend):
    torch.manual_seed(0)
    scale = 0.05
    model = build_model(ModelConfig(backend=backend, cell="lstm", hidden_size=64, num_layers=2, embed_size=32,
                                    init="normal", init_scale=scale), 80)
    names = [n for n, _ in model.named_parameters()]
    assert any("bias" in n for n in names) and any("weight_hh" in n for n in names)
    for name, p in model.named_parameters():
        if "bias" in name:
            assert torch.all(p == 0), name
        else:
            assert abs(p.std().item() - scale) < 0.1 * scale, name
            assert abs(p.mean().item()) < 0.1 * scale, name


@pytest.mark.parametrize("backend", ["torch", "scratch"])
def test_uniform_init(backend):
    torch.manual_seed(0)
    scale = 0.1
    model = build_model(ModelConfig(backend=backend, hidden_size=64, embed_size=32, init="uniform",
                                    init_scale=scale), 80)
    for name, p in model.named_parameters():
        assert p.abs().max() <= scale, name
        assert p.abs().max() > 0.9 * scale, name
        # U(-a, a) has std a / sqrt(3)
        assert abs(p.std().item() - scale / math.sqrt(3)) < 0.15 * scale, name


def test_default_init_is_torchs_for_both_backends():
    torch.manual_seed(0)
    bound = 1 / math.sqrt(64)
    for backend in ("torch", "scratch"):
        model = build_model(ModelConfig(backend=backend, hidden_size=64, embed_size=32, init="default"), 80)
        rnn_params = list(model.rnn.parameters())
        assert len(rnn_params) == 4
        for p in rnn_params:
            assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
        assert abs(model.embedding.weight.std().item() - 1.0) < 0.05  # nn.Embedding's N(0, 1)


def test_config_validation_errors():
    with pytest.raises(ValidationError, match="relu"):
        ModelConfig(cell="gru", nonlinearity="relu")
    with pytest.raises(ValidationError, match="tie_weights"):
        ModelConfig(hidden_size=8, embed_size=4, tie_weights=True)
    with pytest.raises(ValidationError):
        ModelConfig(cell="transformer")
    with pytest.raises(ValidationError):
        ModelConfig(dropout=1.0)
    with pytest.raises(ValidationError):
        ModelConfig(hidden_sise=8)
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(ModelConfig(), 0)
