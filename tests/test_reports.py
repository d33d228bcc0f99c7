"""The run summary's registry lines (flows.reports.registration_lines)."""

from __future__ import annotations

from flows.reports import registration_lines


def registered(new_version: bool, **gate) -> dict:
    gate = {"promoted": False, "champion_version": "1", "reason": "test perplexity 5.0 >= champion v1's 4.0",
            "comparable": True, "decided_before": not new_version, **gate}
    return {"registered": True, "new_version": new_version, "name": "rnnlm-x", "version": "2",
            "tracking_uri": "sqlite:////tmp/mlflow.db", "gate": gate}


def test_an_unchanged_run_says_nothing_new_was_registered():
    lines = "\n".join(registration_lines(registered(False)))
    assert "nothing new to register (version 2 unchanged" in lines and "(decided before)" in lines
    assert "rnnlm-x version 2" not in lines


def test_a_new_version_and_a_not_comparable_gate_show_the_reason():
    reason = "not comparable: champion v1 differs from dataset abc: vocabulary sha256 1 vs 2; champion v1 kept"
    lines = registration_lines(registered(True, comparable=False, reason=reason))
    assert lines[0].endswith("rnnlm-x version 2 (challenger; champion stays version 1)")
    assert lines[1] == f"  gate              {reason}"
    assert registration_lines(None) == [] and registration_lines({"registered": False}) == []
