"""Sweep files, their trials and successive halving's decisions (pure functions: no training, no servers)."""

from __future__ import annotations

import pytest

from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.sweep import (Halving, SweepConfig, best_trial, combinations, expand, load_sweep, rung_budgets,
                            survivors)


def test_a_grid_expands_to_every_combination_in_file_order_with_stable_ids():
    sweep = SweepConfig.model_validate({"grid": {"train.lr": [0.004, 0.001], "model.dropout_output": [0.1, 0.2]}})
    trials = expand(sweep, RunConfig())
    assert [t.overrides for t in trials] == [
        {"train.lr": 0.004, "model.dropout_output": 0.1}, {"train.lr": 0.004, "model.dropout_output": 0.2},
        {"train.lr": 0.001, "model.dropout_output": 0.1}, {"train.lr": 0.001, "model.dropout_output": 0.2}]
    assert [(t.config.train.lr, t.config.model.dropout_output) for t in trials] == [
        (0.004, 0.1), (0.004, 0.2), (0.001, 0.1), (0.001, 0.2)]
    assert [t.id for t in trials] == [t.id for t in expand(sweep, RunConfig())]
    assert len({t.id for t in trials}) == 4 and trials[2].id.startswith("t02-")
    assert trials[0].config.model.hidden_size == RunConfig().model.hidden_size  # the rest is the base's


def test_a_random_sample_is_distinct_and_fixed_by_its_seed():
    space = {"train.lr": [0.1, 0.01, 0.001], "model.hidden_size": [8, 16, 32]}
    draw = lambda seed, n=4: combinations(SweepConfig.model_validate(  # noqa: E731
        {"random": {"samples": n, "seed": seed, "space": space}}))
    assert draw(0) == draw(0) and len(draw(0)) == 4
    assert len({tuple(c.values()) for c in draw(0)}) == 4
    assert draw(0) != draw(1)
    assert len(draw(0, n=50)) == 9  # never more than the space holds


@pytest.mark.parametrize("raw, words", [
    ({"grid": {"train.lr": [0.1]}, "random": {"samples": 1, "space": {"train.lr": [0.1]}}}, "exactly one"),
    ({}, "exactly one"),
    ({"grid": {"lr": [0.1]}}, "'lr' is not a section.key"),
    ({"grid": {"training.lr": [0.1]}}, "'training.lr' is not a section.key"),
    ({"grid": {"train.lr": []}}, "train.lr has no values"),
    ({"grid": {"train.lr": [0.1]}, "trials": 3}, "trials"),
    ({"grid": {"train.lr": [0.1]}, "halving": {"eta": 1, "first_rung_steps": 5}}, "eta"),
])
def test_a_bad_sweep_file_is_refused_naming_the_key(tmp_path, raw, words):
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_sweep(str(path))
    assert str(path) in str(e.value) and words in str(e.value)


def test_a_bad_value_fails_up_front_naming_the_trial_and_key():
    sweep = SweepConfig.model_validate({"grid": {"train.lr": [0.1, -1.0]}})
    with pytest.raises(ConfigError) as e:
        expand(sweep, RunConfig())
    message = str(e.value)
    assert "sweep trial t01-" in message and "train.lr" in message and "-1.0" in message
    with pytest.raises(ConfigError, match="train.no_such_key"):
        expand(SweepConfig.model_validate({"grid": {"train.no_such_key": [1]}}), RunConfig())


def test_rung_budgets_grow_by_eta_up_to_the_full_budget():
    assert rung_budgets(Halving(first_rung_steps=10, eta=2), 80, trials=8) == [10, 20, 40, 80]
    assert rung_budgets(Halving(first_rung_steps=10, eta=2), 30, trials=8) == [10, 20, 30]
    assert rung_budgets(Halving(first_rung_steps=10, eta=3), None, trials=4) == [10, 30, None]
    assert rung_budgets(Halving(first_rung_steps=10, eta=2), 80, trials=1) == [80]


def test_successive_halving_on_planted_curves_stops_the_worst_at_each_rung():
    # validation perplexity of each trial at each rung's budget, as if read from its metrics
    curves = {"a": [9.0, 7.0, 6.5], "b": [8.0, 7.5, 7.4], "c": [12.0, 11.0, 10.0], "d": [8.5, 6.0, 5.0],
              "e": [float("nan")], "f": [8.0, 8.0, 8.0]}
    alive, stopped = list(curves), []
    for rung in range(3):
        scores = {t: curves[t][rung] for t in alive}
        keep = survivors(scores, eta=2)
        stopped.append(sorted(set(alive) - set(keep)))
        alive = keep
    # rung 0: 6 -> 3 (b and f tie at 8.0, both kept; the diverged e never is); rung 1: 3 -> 2; rung 2: 2 -> 1
    assert stopped == [["a", "c", "e"], ["f"], ["b"]] and alive == ["d"]
    assert survivors({"x": 5.0, "y": 5.0, "z": 6.0}, eta=3) == ["x"]  # a tie goes to the earlier trial
    assert survivors({"x": None, "y": float("inf")}, eta=2) == []
    assert best_trial({"x": 7.0, "y": 3.0, "z": None}) == "y" and best_trial({"x": None}) is None
