"""Acceptance (issue 10): nightly retraining on a growing corpus is never silently wrong.

Three nights on a corpus that grows each night (appended text), the vocabulary pinned to
the champion's from night 2 on (``pin_vocab="champion"``, what ``rnnlm run --pin-vocab
champion`` sets): three versions, each gate decision like for like on the night's own
held-out split, the champion alias moving only when that perplexity improves. A fourth
night with nothing changed registers nothing new and says so. The real retrain flow on a
temporary Prefect server, MLflow on SQLite under the test's store; a tiny GRU, 2 epochs.
"""

from __future__ import annotations

import pytest

from tests.test_flows import TEXT, corpus, prefect_server, retrain, run_config  # noqa: F401 (module fixture)

pytestmark = pytest.mark.slow

GROWTH = [
    "",
    "Filby became pensive. 'Clearly,' the Time Traveller proceeded, 'any real body must have extension\n" * 3,
    "in four directions: it must have Length, Breadth, Thickness, and Duration.'\n" * 3,
]
MODEL = "rnnlm-custom"


def night(path, store):
    return retrain(run_config(path), store, register_model=True, pin_vocab="champion")


def test_three_nights_on_a_growing_corpus_then_an_unchanged_fourth(tmp_path, store):
    from mlflow import MlflowClient

    from flows.reports import registration_lines
    from pipeline.data.shards import open_dataset
    from pipeline.registry.tracking import tracking_uri

    client = MlflowClient(tracking_uri(store))
    path, text, results = corpus(tmp_path, TEXT), TEXT, []
    for n, extra in enumerate(GROWTH, 1):
        text += extra
        path.write_text(text, encoding="utf-8")
        before = None if n == 1 else str(client.get_registered_model(MODEL).aliases["champion"])
        result = night(path, store)
        reg, gate, ds = result["registered"], result["registered"]["gate"], result["dataset"]
        results.append(result)
        assert (reg["version"], reg["new_version"], gate["decided_before"]) == (str(n), True, False)
        assert n == 1 or ds["num_tokens"] > results[-2]["dataset"]["num_tokens"]  # the corpus grew
        pinned = result["config"]["data"]["vocab"]["pinned"]
        if n == 1:  # no champion yet: the first night builds the vocabulary the later ones pin
            assert pinned is None and gate["promoted"] and gate["champion_version"] is None
            continue
        champion_ds = results[int(before) - 1]["dataset"]
        assert pinned["uri"] == champion_ds["uri"]  # pinned to the champion's dataset
        assert open_dataset(ds["uri"]).vocab.tokens == open_dataset(results[0]["dataset"]["uri"]).vocab.tokens
        # like for like: both figures on this night's test split, recorded as such
        tags = client.get_model_version(MODEL, reg["version"]).tags
        assert tags["gate.comparable"] == "true" and gate["comparable"]
        assert (tags["gate.split"], tags["gate.dataset_id"]) == ("test", ds["dataset_id"])
        assert gate["champion_version"] == before and gate["champion_ppl"] is not None
        assert float(tags["gate.candidate_ppl"]) == gate["candidate_ppl"] == result["evaluation"]["test_ppl"]
        assert float(tags["gate.champion_ppl"]) == gate["champion_ppl"]
        # the alias moves exactly when the held-out perplexity improves
        improved = gate["candidate_ppl"] < gate["champion_ppl"]
        assert gate["promoted"] == improved and tags["gate.decision"] == ("promoted" if improved else "rejected")
        after = str(client.get_registered_model(MODEL).aliases["champion"])
        assert after == (reg["version"] if improved else before)
    assert len({r["dataset"]["dataset_id"] for r in results}) == 3

    # Night 4: nothing changed. Every stage cached, nothing new registered, and the run says so.
    champion = str(client.get_registered_model(MODEL).aliases["champion"])
    fourth = night(path, store)
    reg = fourth["registered"]
    assert (reg["version"], reg["new_version"], reg["gate"]["decided_before"]) == ("3", False, True)
    assert fourth["dataset"]["dataset_id"] == results[-1]["dataset"]["dataset_id"]
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 3
    assert str(client.get_registered_model(MODEL).aliases["champion"]) == champion
    assert any("nothing new to register (version 3 unchanged" in line for line in registration_lines(reg))
