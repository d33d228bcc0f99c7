"""Models registered by earlier layouts of ``pipeline`` keep loading and generating.

``fixtures/registered-before-subpackages/model`` is the MLflow model directory of a version
registered when ``pipeline/`` was one flat package (code_version in expected.json): it ships
``pipeline/lm.py`` and imports ``pipeline.lm``, names that no longer exist in the project.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.registry import consumer, gate, tracking
from tests.test_registry import CONSUMER, REPO, child_env

FIXTURE = Path(__file__).parent / "fixtures" / "registered-before-subpackages"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def test_a_consumer_without_the_project_serves_it_with_its_shipped_code(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CONSUMER, str(REPO), str(FIXTURE / "model")], env=child_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["pipeline_file"] == str(FIXTURE / "model" / "code" / "pipeline" / "__init__.py")
    assert "pipeline.lm" in out["pipeline_modules"]  # the flat layout it was registered with
    assert out["greedy"] == EXPECTED["greedy"] and out["sampled"] == EXPECTED["sampled"]


def test_the_project_loads_it_with_its_own_code():
    """What the gate (re-scoring the champion) and `rnnlm generate --model models:/...` do, in a
    process where today's ``pipeline`` is already imported."""
    lm = consumer.load_registered_lm(str(FIXTURE / "model"))
    assert type(lm).__module__ == "pipeline.model.lm"
    assert [lm.generate("time traveller", 50, seed=0)] == EXPECTED["greedy"]
    assert [lm.generate(p, 40, temperature=1.0, top_k=5, seed=7) for p in ("Time Traveller", "the")] == \
        EXPECTED["sampled"]


def test_registered_it_loads_through_the_gate_and_rnnlm_generate(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = str(tmp_path / "store")
    c = tracking.client(root)
    c.create_registered_model("rnnlm-old")
    version = c.create_model_version("rnnlm-old", source=str(FIXTURE / "model")).version
    lm = gate.load_version_lm("rnnlm-old", version, root=root)  # what re-scoring the champion loads
    assert [lm.generate("time traveller", 50, seed=0)] == EXPECTED["greedy"]
    assert [consumer.generate_from_uri(f"models:/rnnlm-old/{version}", "time traveller", 50, seed=0,
                                       root=root)] == EXPECTED["greedy"]
