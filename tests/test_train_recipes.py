"""AWD-LSTM's training recipe in the trainer: NT-ASGD, AR/TAR, variable BPTT, early stopping.

Single process; test_ddp_recipes.py runs them under torchrun. Tiny models on a few
thousand Time Machine characters: each run takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.training.checkpoint import list_checkpoints, load_checkpoint
from pipeline.config import ModelConfig, TrainConfig
from pipeline.config_sources import load_run_config
from pipeline.training.distributed import Dist
from pipeline.errors import ConfigError
from pipeline.model.evaluate import perplexity
from pipeline.model.models import build_model
from pipeline.training.optim import LRSchedule
from pipeline.training.train import train
from tests.test_train import corpus, epochs_of, one_thread, weights  # noqa: F401

GRU = dict(cell="gru", hidden_size=64, embed_size=16, init="default")
SGD = dict(epochs=10, optimizer="sgd", lr=2.0, batch_size=8, num_steps=20)
# Every technique at once, tuned so the NT-ASGD trigger fires at epoch 8 of 12.
AWD_MODEL = dict(cell="lstm", hidden_size=48, embed_size=16, num_layers=2, init="default", dropout_input=0.1,
                 dropout_between=0.1, dropout_output=0.1, dropout_embedding=0.05, weight_drop=0.2)
AWD_TRAIN = dict(epochs=12, optimizer="nt_asgd", nt_asgd_window=1, lr=4.0, batch_size=8, num_steps=20, ar=1.0,
                 tar=1.0, variable_bptt=True, patience=3, checkpoint_every_steps=7, keep_checkpoints=100)


def run(tmp_path: Path, name: str, model: dict, cfg: dict, tokens: int = 4000) -> tuple[dict, Path]:
    tr, va, vocab = corpus(tokens, val_tokens=2000)
    run_dir = tmp_path / name
    return train(tr, va, vocab, ModelConfig(**model), TrainConfig(**cfg), str(run_dir), dist_info=Dist()), run_dir


def val_ppls(run_dir: Path) -> list[float]:
    return [e["val_ppl"] for e in epochs_of(run_dir)]


def nt_trigger_epoch(vals: list[float], window: int) -> int | None:
    """AWD-LSTM's rule, written out: the first epoch worse than the best before the last `window`."""
    for i in range(window + 1, len(vals)):
        if vals[i] > min(vals[: i - window]):
            return i + 1
    return None


def test_nt_asgd_follows_sgd_until_the_trigger_then_validates_and_ships_the_average(tmp_path):
    sgd, sgd_dir = run(tmp_path, "sgd", GRU, SGD)
    nt, nt_dir = run(tmp_path, "nt", GRU, {**SGD, "optimizer": "nt_asgd", "nt_asgd_window": 1})
    plain, averaged = val_ppls(sgd_dir), val_ppls(nt_dir)
    trigger = nt_trigger_epoch(plain, 1)
    assert trigger is not None and trigger < SGD["epochs"] - 1, plain
    assert averaged[:trigger] == plain[:trigger]  # plain SGD up to and including the trigger epoch
    assert all(a != p for a, p in zip(averaged[trigger:], plain[trigger:]))
    last = load_checkpoint(list_checkpoints(str(nt_dir / "checkpoints"))[-1])
    assert last["averaging"]["triggered_at"] == trigger
    # The shipped weights are the average (as validated), not the raw SGD iterate.
    shipped = weights(nt_dir)
    assert any(not torch.equal(shipped[k], last["model"][k]) for k in shipped)
    tr, va, vocab = corpus(4000, val_tokens=2000)
    model = build_model(ModelConfig(**GRU), vocab)
    model.load_state_dict(shipped)
    assert perplexity(model, va) == nt["val_ppl"]  # the one evaluation setting, bit for bit
    assert nt["val_ppl"] == min(averaged)


def test_every_recipe_is_deterministic_and_resumes_exactly_mid_epoch(tmp_path):
    ref, ref_dir = run(tmp_path, "ref", AWD_MODEL, AWD_TRAIN)
    again, again_dir = run(tmp_path, "again", AWD_MODEL, AWD_TRAIN)
    assert val_ppls(ref_dir) == val_ppls(again_dir)
    # A checkpoint inside an epoch after the trigger: it carries the running average,
    # the early-stopping count, the streams' hidden state and the position in the epoch.
    mids = [u for u in list_checkpoints(str(ref_dir / "checkpoints")) if load_checkpoint(u)["hidden"] is not None]
    mid = next(u for u in mids if load_checkpoint(u)["epoch"] == 9)
    assert int(load_checkpoint(mid)["averaging"]["average"]["n_averaged"]) > 0
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(mid, tmp_path / "resumed" / "checkpoints")
    resumed, resumed_dir = run(tmp_path, "resumed", AWD_MODEL, AWD_TRAIN)
    a, b = weights(ref_dir), weights(resumed_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert val_ppls(resumed_dir) == val_ppls(ref_dir)[9:]  # the epochs it trained
    assert resumed["val_ppl"] == ref["val_ppl"] and resumed["best_epoch"] == ref["best_epoch"]


def test_patience_stops_after_that_many_epochs_without_improvement(tmp_path):
    # A tiny training set overfits within a few epochs (as in test_train's keep_best test).
    cfg = dict(epochs=30, optimizer="adam", lr=0.02, batch_size=8, num_steps=20, patience=2)
    result, run_dir = run(tmp_path, "run", dict(cell="gru", hidden_size=128, embed_size=16), cfg, tokens=3000)
    vals = val_ppls(run_dir)
    best = int(np.argmin(vals)) + 1
    assert len(vals) == best + 2 < 30  # stopped two epochs after the best one
    assert not result["finished"] and result["best_epoch"] == best and result["val_ppl"] == min(vals)
    assert all(v >= min(vals) for v in vals[best:])
    # Run again (a retry, a second `rnnlm train`): the run early stopping ended stays ended.
    again, _ = run(tmp_path, "run", dict(cell="gru", hidden_size=128, embed_size=16), cfg, tokens=3000)
    assert val_ppls(run_dir) == vals and again["epochs"] == result["epochs"]


def test_activation_regularisers_shrink_what_they_penalise(tmp_path):
    tr, va, vocab = corpus(4000, val_tokens=2000)
    X = torch.from_numpy(va[:1600].astype(np.int64)).reshape(8, 200)

    def activations(name, **penalties):
        _, run_dir = run(tmp_path, name, GRU, {**SGD, "epochs": 4, **penalties})
        model = build_model(ModelConfig(**GRU), vocab).eval()
        model.load_state_dict(weights(run_dir))
        with torch.no_grad():
            _, _, (raw, _) = model(X, with_activations=True)
        return raw.pow(2).mean().item(), (raw[:, 1:] - raw[:, :-1]).pow(2).mean().item()

    plain_ar, plain_tar = activations("plain")
    ar, _ = activations("ar", ar=4.0)
    _, tar = activations("tar", tar=4.0)
    assert ar < 0.8 * plain_ar
    assert tar < 0.8 * plain_tar


def test_variable_bptt_scales_each_steps_lr_by_its_length():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = LRSchedule(optimizer, TrainConfig(lr=0.5))
    schedule.scale_batch(30 / 20)
    assert optimizer.param_groups[0]["lr"] == 0.75
    schedule.step(1, 3.0)  # the next epoch's rate is unscaled, and so is the checkpointed one
    assert optimizer.param_groups[0]["lr"] == 0.5 and schedule.state_dict()["lr"] == 0.5


def test_variable_bptt_trains_fewer_tokens_in_varying_windows(tmp_path):
    fixed, _ = run(tmp_path, "fixed", GRU, {**SGD, "epochs": 2})
    variable, variable_dir = run(tmp_path, "variable", GRU, {**SGD, "epochs": 2, "variable_bptt": True})
    assert variable["steps"] == fixed["steps"]  # the same number of batches per epoch ...
    assert val_ppls(variable_dir) != val_ppls(tmp_path / "fixed")  # ... of other lengths


def test_recipe_config_errors():
    with pytest.raises(ConfigError, match="variable_bptt needs sampling='sequential'"):
        load_run_config("timemachine-char", ["train.variable_bptt=true", "train.sampling=random"])
    with pytest.raises(ConfigError, match="patience"):
        load_run_config("timemachine-char", ["train.patience=0"])
    with pytest.raises(ConfigError, match="optimizer"):
        load_run_config("timemachine-char", ["train.optimizer=asgd"])


def test_quality_bench_ablation_turns_off_one_technique_per_run():
    bench = _quality_bench()
    everything = [f"model.{k}={v}" for k, v in AWD_MODEL.items() if k.startswith(("dropout", "weight"))] + \
                 ["model.dropout=0", "train.optimizer=nt_asgd", "train.ar=2", "train.tar=1", "train.variable_bptt=true",
                  "train.patience=3"]
    cfg = load_run_config("timemachine-char", everything)
    variants = bench.ablation_variants(cfg)
    names = [name for name, _ in variants]
    assert names == ["without locked dropout", "without embedding dropout", "without weight drop", "without AR/TAR",
                     "without variable BPTT", "without NT-ASGD", "without early stopping", "none of them"]
    for (name, off), (technique, is_on, _) in zip(variants, [t for t in bench.TECHNIQUES if t[1](cfg)]):
        variant = load_run_config("timemachine-char", everything + [f"{k}={json.dumps(v)}" for k, v in off.items()])
        assert not is_on(variant) and name == f"without {technique}"
        others = [t for t in bench.TECHNIQUES if t[0] != technique and t[1](cfg)]
        assert all(on(variant) for _, on, _ in others)  # only that one is off
    none = load_run_config("timemachine-char", everything + [f"{k}={json.dumps(v)}" for k, v in variants[-1][1].items()])
    assert not any(on(none) for _, on, _ in bench.TECHNIQUES)


def _quality_bench():
    """bench/train_quality.py as a module (bench/ is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_quality", Path(__file__).parents[1] / "bench" / "train_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_quality_bench_counts_only_the_epochs_within_the_budget():
    # The run ends after the epoch that passes max_minutes: that epoch's figure is past the budget.
    bench = _quality_bench()
    epochs = [{"epoch": 1, "val_ppl": 4.40, "elapsed_s": 150.0}, {"epoch": 2, "val_ppl": 4.29, "elapsed_s": 170.0},
              {"epoch": 3, "val_ppl": 4.28, "elapsed_s": 190.0}]
    assert bench.best_within(epochs, 180.0)["epoch"] == 2
    assert bench.best_within(epochs, 1000.0)["epoch"] == 3
    assert bench.best_within(epochs, 100.0) is None
    assert bench.best_within([{"epoch": 1, "val_ppl": None, "elapsed_s": 1.0}], 180.0) is None


def test_checkpoints_from_before_the_new_fields_still_resume():
    # A checkpoint written before issue 14 lacks the new config keys: they count as their defaults.
    from pipeline.training.checkpoint import check_compatible
    from pipeline.errors import CheckpointError

    model, cfg = ModelConfig(**GRU), TrainConfig(**SGD)
    new_model_keys = {"dropout_input", "dropout_between", "dropout_output", "dropout_embedding", "weight_drop"}
    new_train_keys = {"nt_asgd_window", "patience", "ar", "tar", "variable_bptt"}
    old = {"vocab_size": 28, "train_tokens": 4000,
           "model_config": {k: v for k, v in model.model_dump(mode="json").items() if k not in new_model_keys},
           "train_config": {k: v for k, v in cfg.model_dump(mode="json").items() if k not in new_train_keys}}
    check_compatible(old, "old.pt", model_config=model.model_dump(mode="json"),
                     train_config=cfg.model_dump(mode="json"), vocab_size=28, train_tokens=4000)
    with pytest.raises(CheckpointError, match="model.weight_drop 0.0 != 0.2"):  # a real change is still refused
        check_compatible(old, "old.pt", model_config={**model.model_dump(mode="json"), "weight_drop": 0.2},
                         train_config=cfg.model_dump(mode="json"), vocab_size=28, train_tokens=4000)
