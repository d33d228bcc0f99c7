"""``model.softmax: adaptive``: the head, its loss, perplexity, generation, training and the
MLflow model, each checked against the full distribution the head defines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import DataConfig, ModelConfig, RunConfig, SplitConfig, TrainConfig, parse_config
from pipeline.errors import ConfigError
from pipeline.model.evaluate import mean_cross_entropy
from pipeline.model.generate import generate
from pipeline.model.lm import LanguageModel, write_lm_metadata
from pipeline.model.models import build_model

torch.set_num_threads(1)

V = 40
ADAPTIVE = dict(softmax="adaptive", adaptive_cutoffs=(6, 20))


def adaptive_model(cell="lstm", backend="torch", **extra):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, backend=backend, hidden_size=16, num_layers=2, embed_size=8,
                      init="uniform", init_scale=0.3, **ADAPTIVE, **extra)
    return build_model(cfg, V)


def test_config_checks_the_cutoffs():
    for bad in ({"softmax": "adaptive"}, {"softmax": "adaptive", "adaptive_cutoffs": [5, 5]},
                {"softmax": "adaptive", "adaptive_cutoffs": [0, 5]},
                {"adaptive_cutoffs": [5]},  # cutoffs without the adaptive head
                {**ADAPTIVE, "tie_weights": True, "embed_size": 16, "hidden_size": 16}):
        with pytest.raises(ConfigError, match="adaptive"):
            parse_config(ModelConfig, bad)
    with pytest.raises(ValueError, match="below the dataset.s vocabulary size 20"):
        build_model(ModelConfig(**ADAPTIVE), 20)


@pytest.mark.parametrize("backend", ["torch", "scratch"])
def test_logits_are_a_distribution_and_the_loss_scores_it(backend):
    model = adaptive_model(backend=backend).eval()
    X = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(1))
    Y = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        log_probs, _ = model(X)
        loss, _ = model(X, targets=Y)
        per_token, _ = model(X, targets=Y, reduction="none")
    assert log_probs.shape == (3, 7, V)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 7))
    expected = -log_probs.gather(-1, Y[..., None]).squeeze(-1)
    torch.testing.assert_close(per_token, expected.reshape(-1))
    torch.testing.assert_close(loss, expected.mean())
    # The "logits" really are logits: cross-entropy over them is the same figure.
    torch.testing.assert_close(F.cross_entropy(log_probs.reshape(-1, V), Y.reshape(-1)), loss)


def test_perplexity_counts_every_target_with_the_adaptive_head():
    model = adaptive_model()
    ids = np.random.default_rng(0).integers(0, V, 101)
    with torch.no_grad():
        log_probs, _ = model.eval()(torch.from_numpy(ids[:-1])[None])
    naive = -log_probs[0].gather(-1, torch.from_numpy(ids[1:])[:, None]).sum().item() / 100
    assert mean_cross_entropy(model, ids, batch_size=1, num_steps=9) == pytest.approx(naive, rel=1e-5)


def test_generation_follows_the_adaptive_distribution():
    model = adaptive_model()
    vocab = ["<unk>"] + [f"t{i}" for i in range(1, V)]
    greedy = generate(model, vocab, ["t3", "t7"], 6).tokens
    ids, state = [3, 7], None
    with torch.no_grad():  # greedy by hand: argmax of the head's log-probabilities
        log_probs, state = model(torch.tensor([ids]))
        by_hand = []
        for _ in range(6):
            by_hand.append(int(log_probs[0, -1].argmax()))
            log_probs, state = model(torch.tensor([[by_hand[-1]]]), state)
    assert greedy == [vocab[i] for i in by_hand]
    sampled = generate(model, vocab, ["t3"], 20, temperature=1.0, seed=5).tokens
    assert sampled == generate(model, vocab, ["t3"], 20, temperature=1.0, seed=5).tokens
    assert len(set(sampled)) > 1


ADAPTIVE_MODEL = ModelConfig(cell="gru", hidden_size=32, embed_size=16, softmax="adaptive", adaptive_cutoffs=(8, 16))
ADAPTIVE_TRAIN = TrainConfig(epochs=3, batch_size=16, num_steps=20, optimizer="adam", lr=0.01, device="cpu")
DATA = DataConfig(splits=SplitConfig(max_tokens=8_000))  # 28 characters


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory):
    """(dataset, run directory, result) of an adaptive-head GRU trained through pipeline.training.train."""
    from pipeline.data.prepare import prepare_dataset
    from pipeline.training.train import train

    base = tmp_path_factory.mktemp("adaptive")
    dataset = prepare_dataset(DATA, str(base / "store"))
    run_dir = base / "run"
    result = train(dataset.split("train"), dataset.split("val"), dataset.vocab_size, ADAPTIVE_MODEL,
                   ADAPTIVE_TRAIN, str(run_dir))
    write_lm_metadata(str(run_dir), dataset)
    return dataset, run_dir, result


def test_adaptive_head_trains_and_reloads(adaptive_run, tmp_path):
    dataset, run_dir, result = adaptive_run
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1]["val_ppl"] < epochs[0]["val_ppl"] < dataset.vocab_size  # it learns
    lm = LanguageModel.from_dir(str(run_dir))
    # result.json's val_ppl is the one evaluation setting's (pipeline.model.evaluate), whatever the training batch
    assert lm.perplexity(dataset.split("val")) == pytest.approx(result["val_ppl"], rel=1e-5)
    paths = lm.save(str(tmp_path / "served"))  # what the MLflow model ships and loads
    saved = LanguageModel.from_files(paths["model"], paths["model_config"], paths["lm"])
    assert saved.generate("time traveller", 30) == lm.generate("time traveller", 30)
    assert isinstance(saved.model.output, torch.nn.AdaptiveLogSoftmaxWithLoss)
    assert math.isfinite(saved.perplexity(dataset.split("test")))


def test_adaptive_model_registers_passes_the_gate_and_serves(adaptive_run):
    """The registry path: tracked run, registered pyfunc, the gate's evaluation, a champion that generates."""
    import mlflow

    from pipeline.registry import gate, packaging, run_logging, tracking

    dataset, run_dir, _ = adaptive_run
    run_id = run_logging.log_training_run(str(run_dir), dataset, preset="test-adaptive",
                                          config=RunConfig(data=DATA, model=ADAPTIVE_MODEL, train=ADAPTIVE_TRAIN))
    version = packaging.register_model(run_id, str(run_dir), name="rnnlm-adaptive")
    lm = LanguageModel.from_dir(str(run_dir))
    held_out = gate.held_out_split(dataset)
    assert version.test_ppl == pytest.approx(lm.perplexity(dataset.split(held_out)), rel=1e-6)
    decision = gate.promote_if_better("rnnlm-adaptive", version.version, dataset)
    assert decision.promoted and math.isfinite(decision.candidate_ppl)
    with tracking.using_tracking():
        served = mlflow.pyfunc.load_model("models:/rnnlm-adaptive@champion")
    assert served.predict(["time traveller"], params={"num_tokens": 30}) == [lm.generate("time traveller", 30)]


def test_run_config_accepts_the_adaptive_preset_keys():
    cfg = parse_config(RunConfig, {"model": {"softmax": "adaptive", "adaptive_cutoffs": [2000, 10000]},
                                   "train": {"precision": "bf16", "tf32": False}})
    assert cfg.model.adaptive_cutoffs == (2000, 10000) and cfg.train.precision == "bf16"


# ------------------------------------------------------------------ softmax: auto


def test_auto_picks_the_head_measured_faster_on_the_device():
    from pipeline.model.models import ADAPTIVE_FROM, choose_softmax, default_cutoffs

    auto = ModelConfig(softmax="auto", hidden_size=16, embed_size=8)
    for device, vocab, head in [("cpu", ADAPTIVE_FROM["cpu"] - 1, "full"), ("cpu", ADAPTIVE_FROM["cpu"], "adaptive"),
                                ("cuda", 50_000, "full"), ("cuda", ADAPTIVE_FROM["cuda"] - 1, "full"),
                                ("cuda", ADAPTIVE_FROM["cuda"], "adaptive"), ("mps", 100_000, "full")]:
        chosen = choose_softmax(auto, vocab, device)
        assert chosen.softmax == head, (device, vocab)
        assert chosen.adaptive_cutoffs == (default_cutoffs(vocab) if head == "adaptive" else None)
        build_model(chosen, vocab)  # a head that fits its vocabulary
    assert default_cutoffs(250_000) == (20_000, 100_000)
    given = ModelConfig(softmax="auto", adaptive_cutoffs=(100, 2000))
    assert choose_softmax(given, 10_000, "cpu").adaptive_cutoffs == (100, 2000)
    assert choose_softmax(given, 100, "cpu").adaptive_cutoffs is None
    for fixed in (ModelConfig(), ModelConfig(**ADAPTIVE)):
        assert choose_softmax(fixed, 10**6, "cpu") is fixed
    with pytest.raises(ValueError, match="choose_softmax"):
        build_model(auto, 100)  # unresolved: the device decides
    for bad in ({"softmax": "auto", "tie_weights": True}, {"softmax": "auto", "adaptive_cutoffs": [7, 3]}):
        with pytest.raises(ConfigError, match="tie_weights|adaptive_cutoffs"):
            parse_config(ModelConfig, bad)


def test_training_saves_the_head_auto_chose(tmp_path):
    """The run's saved config names the chosen head, so the model loads anywhere without a device."""
    from pipeline.model.models import ADAPTIVE_FROM
    from pipeline.training.train import train

    vocab = ADAPTIVE_FROM["cpu"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, 4_000)
    cfg = ModelConfig(softmax="auto", hidden_size=16, embed_size=8)
    small = TrainConfig(epochs=1, batch_size=4, num_steps=10, max_steps=3, device="cpu")
    for name, vocab_size in (("big", vocab), ("small", 500)):
        train(ids % vocab_size, ids[:400] % vocab_size, vocab_size, cfg, small, str(tmp_path / name))
    saved = {name: json.loads((tmp_path / name / "model_config.json").read_text()) for name in ("big", "small")}
    assert saved["big"]["softmax"] == "adaptive" and saved["big"]["adaptive_cutoffs"] == [800, 4000]
    assert saved["small"]["softmax"] == "full" and saved["small"]["adaptive_cutoffs"] is None
    state = torch.load(tmp_path / "big" / "model.pt", weights_only=True)
    model = build_model(ModelConfig.model_validate({k: v for k, v in saved["big"].items() if k != "vocab_size"}), vocab)
    model.load_state_dict(state)
    assert isinstance(model.output, torch.nn.AdaptiveLogSoftmaxWithLoss)
