"""Mixed precision on CPU: bf16 autocast and the fp16 gradient scaler (pipeline.training.precision)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.model.models import build_model
from pipeline.training.precision import MixedPrecision
from pipeline.training.optim import clip_grad_norm_

torch.set_num_threads(1)

V = 30


def model_and_batch(cell, backend, softmax="full"):
    torch.manual_seed(0)
    extra = {"softmax": "adaptive", "adaptive_cutoffs": (5, 12)} if softmax == "adaptive" else {}
    model = build_model(ModelConfig(cell=cell, backend=backend, hidden_size=32, num_layers=2,
                                    embed_size=16, init="uniform", init_scale=0.2, **extra), V)
    g = torch.Generator().manual_seed(1)
    return model, torch.randint(0, V, (4, 9), generator=g), torch.randint(0, V, (4, 9), generator=g)


def loss_state_grads(model, X, Y, precision):
    model.zero_grad(set_to_none=True)
    with MixedPrecision(precision, torch.device("cpu")).autocast():
        loss, state = model(X, model.begin_state(X.shape[0]), targets=Y)
    loss.backward()
    return loss, state, torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("backend", ["torch", "scratch"])
@pytest.mark.parametrize("cell,softmax", [("lstm", "full"), ("gru", "adaptive"), ("rnn", "full")])
def test_bf16_autocast_on_cpu_keeps_state_and_loss_in_fp32(cell, backend, softmax):
    model, X, Y = model_and_batch(cell, backend, softmax)
    ref_loss, _, ref_grad = loss_state_grads(model, X, Y, "fp32")
    loss, state, grad = loss_state_grads(model, X, Y, "bf16")
    assert loss.dtype == torch.float32 and all(s.dtype == torch.float32 for s in state)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-2)
    assert torch.isfinite(grad).all()
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.99


def test_fp16_scaler_unscales_before_clipping_and_skips_overflowing_steps():
    model, X, Y = model_and_batch("gru", "torch")
    ref_loss, _, ref_grad = loss_state_grads(model, X, Y, "fp32")
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    mp = MixedPrecision("fp16", torch.device("cpu"))
    scale = mp.scaler.get_scale()
    assert scale > 1

    model.zero_grad(set_to_none=True)
    with mp.autocast():
        loss, _ = model(X, targets=Y)
    mp.backward(loss)
    mp.unscale_(opt)
    norm = clip_grad_norm_(params, None)  # the true norm, not the scaled one
    assert norm.item() == pytest.approx(ref_grad.norm().item(), rel=2e-2)
    before = [p.detach().clone() for p in params]
    mp.step(opt)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))  # a finite step is taken

    model.zero_grad(set_to_none=True)
    with mp.autocast():
        loss, _ = model(X, targets=Y)
    mp.backward(loss * float("inf"))  # overflowing gradients
    mp.unscale_(opt)
    before = [p.detach().clone() for p in params]
    mp.step(opt)
    assert all(torch.equal(a, p) for a, p in zip(before, params))  # skipped
    assert mp.scaler.get_scale() == scale / 2  # and the scale backs off

    again = MixedPrecision("fp16", torch.device("cpu"))
    again.load_state_dict(mp.state_dict())  # checkpointed with the optimizer
    assert again.scaler.get_scale() == scale / 2


def test_fp32_is_a_no_op_and_bad_precision_is_named():
    mp = MixedPrecision("fp32", torch.device("cpu"))
    assert mp.scaler is None and mp.state_dict() == {}
    with mp.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ConfigError, match="train.precision"):
        MixedPrecision("fp8", torch.device("cpu"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_in_mixed_precision_on_cpu_tracks_fp32(tmp_path, monkeypatch, precision):
    """Through pipeline.training.train: autocast, the scaler (fp16) and its checkpointed state."""
    from pipeline.training.checkpoint import latest_valid
    from pipeline.config import TrainConfig
    from pipeline.training.train import train
    from tests.test_train import corpus

    monkeypatch.setenv("RNNLM_NUM_THREADS", "1")
    tr, va, vocab = corpus(20_000)
    model_cfg = ModelConfig(cell="gru", hidden_size=32, embed_size=16)
    results = {}
    for p in ("fp32", precision):
        cfg = TrainConfig(epochs=2, batch_size=16, optimizer="adam", lr=0.01, device="cpu", precision=p)
        results[p] = train(tr, va, vocab, model_cfg, cfg, str(tmp_path / p))
    assert results[precision]["val_ppl"] == pytest.approx(results["fp32"]["val_ppl"], rel=0.02)
    ckpt, _ = latest_valid(str(tmp_path / precision / "checkpoints"))
    assert (ckpt["scaler"]["scale"] > 0) if precision == "fp16" else ckpt["scaler"] == {}
