"""Sweeps in the retrain flow end to end: a real (temporary) Prefect server, SQLite MLflow, tiny trials on CPU."""

from __future__ import annotations

import pytest

from tests.test_flows import corpus, options, prefect_server, run_config, states  # noqa: F401 (the server fixture)

pytestmark = pytest.mark.slow


def sweep(**raw):
    from pipeline.sweep import SweepConfig

    return SweepConfig.model_validate(raw)


def retrain(cfg, store, sweep_config, **kw):
    from flows.retrain import retrain_flow

    return retrain_flow(config=cfg, options=options(store, **kw), sweep=sweep_config)


def test_a_grid_registers_its_best_trial_logs_every_trial_and_reruns_from_cache(tmp_path, store):
    from mlflow.tracking import MlflowClient

    from pipeline.registry.tracking import tracking_uri

    cfg = run_config(corpus(tmp_path), epochs=1)
    grid = sweep(grid={"train.lr": [0.02, 0.002], "model.hidden_size": [8, 16]}, trials_per_device=2)
    result = retrain(cfg, store, grid, register_model=True)

    trials = result["sweep"]["trials"]
    assert len(trials) == 4 and all(t["val_ppl"] and t["test_ppl"] for t in trials)
    best = min(trials, key=lambda t: t["val_ppl"])
    assert best["status"] == "best" and result["sweep"]["best"] == best["id"]
    assert sorted(t["status"] for t in trials) == ["best", "finished", "finished", "finished"]
    assert result["run"]["run_dir"] == best["run_dir"] and result["evaluation"]["val_ppl"] == best["val_ppl"]
    assert len({t["run_dir"] for t in trials}) == 4
    assert states(result)["fetch_corpus"] == ["Completed"]  # one data stage for the four trials
    assert states(result)["train_model"] == ["Completed"] * 4

    reg = result["registered"]
    client = MlflowClient(tracking_uri(store))
    champion = client.get_model_version_by_alias("rnnlm-custom", "champion")
    assert str(champion.version) == reg["version"] and reg["gate"]["promoted"]
    assert client.get_run(champion.run_id).data.tags["rnnlm.run_dir"] == best["run_dir"]
    nested = client.search_runs([client.get_run(reg["sweep_run_id"]).info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{reg['sweep_run_id']}'")
    by_trial = {r.data.tags.get("rnnlm.trial"): r for r in nested}
    assert set(by_trial) == {t["id"] for t in trials} | {None}  # the trials, and the registered run
    assert by_trial[best["id"]].data.params == {k: str(v) for k, v in best["overrides"].items()}
    assert client.get_metric_history(by_trial[best["id"]].info.run_id, "val_ppl")  # its curve

    again = retrain(cfg, store, grid, register_model=True)
    assert {s for names in again["stages"].values() for s in names} == {"Cached"}
    assert again["sweep"]["trials"] == trials
    assert (again["registered"]["version"], again["registered"]["new_version"]) == (reg["version"], False)
    assert again["registered"]["sweep_run_id"] == reg["sweep_run_id"]


def test_a_diverging_trial_is_reported_and_the_best_of_the_rest_wins(tmp_path, store):
    from pipeline.errors import NonFiniteLossError

    cfg = run_config(corpus(tmp_path), epochs=1, optimizer="sgd")
    result = retrain(cfg, store, sweep(grid={"train.lr": [0.5, 1e38, 0.2]}))
    trials = {t["overrides"]["train.lr"]: t for t in result["sweep"]["trials"]}
    assert trials[1e38]["status"] == "failed" and "diverged" in trials[1e38]["error"]
    assert sorted(t["status"] for t in trials.values()) == ["best", "failed", "finished"]
    assert result["sweep"]["best"] == min((trials[0.5], trials[0.2]), key=lambda t: t["val_ppl"])["id"]

    with pytest.raises(NonFiniteLossError):  # every trial failing fails the sweep, with the trial's error
        retrain(cfg, store, sweep(grid={"train.lr": [1e38]}))


def test_successive_halving_stops_the_worst_and_survivors_equal_training_alone(tmp_path, store):
    from flows.retrain import retrain_flow

    cfg = run_config(corpus(tmp_path), epochs=2, max_steps=16)
    halving = sweep(grid={"train.lr": [0.02, 0.0002, 0.01, 0.0001]}, halving={"first_rung_steps": 4, "eta": 2})
    result = retrain(cfg, store, halving)
    trials = {t["overrides"]["train.lr"]: t for t in result["sweep"]["trials"]}
    # the two smallest learning rates are worst after 4 steps; of the rest, the better at 8 steps wins
    assert trials[0.0002]["status"] == trials[0.0001]["status"] == "stopped at 4 steps"
    assert {trials[0.02]["status"], trials[0.01]["status"]} == {"best", "stopped at 8 steps"}
    best = trials[0.02] if trials[0.02]["status"] == "best" else trials[0.01]
    assert best["steps"] == 16 and trials[0.0002]["steps"] == 4
    assert sorted(states(result)["train_model"]) == ["Completed"] * 7  # 4 + 2 + 1 trainings

    alone_cfg = run_config(corpus(tmp_path), epochs=2, max_steps=16, lr=best["overrides"]["train.lr"])
    alone = retrain_flow(config=alone_cfg, options=options(str(tmp_path / "alone")))
    assert alone["run"]["model_sha256"] == result["run"]["model_sha256"]
    assert alone["evaluation"]["val_ppl"] == best["val_ppl"]

    # a bigger first rung: the trials stopped at 4 steps resume from their checkpoints, and what
    # was trained to 8 and 16 steps before is cached
    wider = sweep(grid={"train.lr": [0.02, 0.0002, 0.01, 0.0001]}, halving={"first_rung_steps": 8, "eta": 2})
    again = retrain(cfg, store, wider)
    trials = {t["overrides"]["train.lr"]: t for t in again["sweep"]["trials"]}
    assert trials[0.0002]["status"] == trials[0.0001]["status"] == "stopped at 8 steps"
    assert trials[0.0002]["resumed_from_step"] == trials[0.0001]["resumed_from_step"] == 4
    assert sorted(states(again)["train_model"]) == ["Cached"] * 3 + ["Completed"] * 3  # 4 at 8 steps, 2 at 16
