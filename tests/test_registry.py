"""The language-model bundle, the MLflow pyfunc and the registry: real MLflow, no mocks.

Tracking runs on SQLite in each test's own storage root (``$RNNLM_STORAGE``, set by
conftest); servers (``mlflow models serve``, ``mlflow server``) are real subprocesses on
free 127.0.0.1 ports, stopped by process group. Models are tiny GRUs trained for a few
dozen steps once per module, so the file stays around two minutes on two busy cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from flows.servers import TELEMETRY_OFF
from pipeline import errors
from pipeline.registry import consumer, gate, packaging, run_logging, tracking
from pipeline.config import DataConfig, ModelConfig, RunConfig, SourceConfig, SplitConfig, TrainConfig
from pipeline.errors import CheckpointError, NonFiniteLossError
from pipeline.model.generate import MAX_NUM_TOKENS
from pipeline.model.lm import LanguageModel, write_lm_metadata
from pipeline.data.prepare import prepare_dataset
from pipeline.training.train import train

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[1]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
NAME = "rnnlm-test"
PRESET = "test"

TIME_MACHINE = DataConfig(splits=SplitConfig(max_tokens=12_000))


def _ab_text(lines: int = 1000) -> str:
    return "".join("abab abab ab\n" for _ in range(lines))


# ---------------------------------------------------------------------------- fixtures


class Trained:
    """Datasets and run directories shared by the module (trained once)."""

    def __init__(self, base: Path):
        self.base = base
        store = str(base / "store")
        self.tm = prepare_dataset(TIME_MACHINE, store)  # Time Machine, 12k chars
        ab_file = base / "ab.txt"
        ab_file.write_text(_ab_text())
        self.ab_cfg = DataConfig(sources=(SourceConfig(url=str(ab_file)),))
        self.ab = prepare_dataset(self.ab_cfg, store)  # "abab ..." (vocab: <unk>, a, b, space)
        ab2_file = base / "ab2.txt"  # more of the same: another dataset, the same vocabulary
        ab2_file.write_text(_ab_text(1200))
        self.ab2_cfg = DataConfig(sources=(SourceConfig(url=str(ab2_file)),))
        self.ab2 = prepare_dataset(self.ab2_cfg, store)
        # mid: 1 epoch, trained with the scratch backend (served with torch); bad: barely
        # trained; good: 4 epochs; ab: the pattern corpus (near-perfect there, hopeless on tm);
        # ab2: more of the pattern, the same vocabulary (comparable with ab).
        self.runs = {
            "mid": self._train("mid", self.tm, ModelConfig(cell="gru", hidden_size=32, embed_size=16, backend="scratch"),
                               TrainConfig(epochs=1, batch_size=16, num_steps=20, optimizer="adam", lr=0.01, device="cpu")),
            "bad": self._train("bad", self.tm, ModelConfig(cell="gru", hidden_size=32, embed_size=16),
                               TrainConfig(epochs=1, batch_size=16, num_steps=20, optimizer="sgd", lr=0.01, device="cpu")),
            "good": self._train("good", self.tm, ModelConfig(cell="gru", hidden_size=32, embed_size=16),
                                TrainConfig(epochs=4, batch_size=16, num_steps=20, optimizer="adam", lr=0.01, device="cpu")),
            "ab": self._train("ab", self.ab, ModelConfig(cell="gru", hidden_size=16, embed_size=8),
                              TrainConfig(epochs=2, batch_size=16, num_steps=20, optimizer="adam", lr=0.02, device="cpu")),
            "ab2": self._train("ab2", self.ab2, ModelConfig(cell="gru", hidden_size=16, embed_size=8),
                               TrainConfig(epochs=1, batch_size=16, num_steps=20, optimizer="adam", lr=0.02, device="cpu")),
        }

    def _train(self, name, dataset, model_cfg, train_cfg) -> str:
        run_dir = str(self.base / "runs" / name)
        train(dataset.split("train"), dataset.split("val"), dataset.vocab_size, model_cfg, train_cfg, run_dir)
        write_lm_metadata(run_dir, dataset)
        return run_dir

    def config(self, name: str) -> RunConfig:
        raw = json.loads((Path(self.runs[name]) / "model_config.json").read_text())
        raw.pop("vocab_size")
        tcfg = json.loads((Path(self.runs[name]) / "train_config.json").read_text())
        data = {"ab": self.ab_cfg, "ab2": self.ab2_cfg}.get(name, TIME_MACHINE)
        return RunConfig(data=data, model=raw, train=tcfg)

    def dataset(self, name: str):
        return {"ab": self.ab, "ab2": self.ab2}.get(name, self.tm)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    return Trained(tmp_path_factory.mktemp("trained"))


def log_and_register(trained: Trained, name: str, flow_run_id: str | None = None) -> packaging.RegisteredVersion:
    run_id = run_logging.log_training_run(trained.runs[name], trained.dataset(name), preset=PRESET,
                                          config=trained.config(name), flow_run_id=flow_run_id,
                                          flow_run_url=f"http://prefect.invalid/runs/{flow_run_id}")
    return packaging.register_model(run_id, trained.runs[name], name=NAME)


def load_champion(name: str):
    """What a consumer does: ``mlflow.pyfunc.load_model("models:/<name>@champion")`` on our URI."""
    import mlflow

    with tracking.using_tracking():
        return mlflow.pyfunc.load_model(f"models:/{name}@{packaging.CHAMPION}")


def champion_version() -> str:
    return str(tracking.client().get_model_version_by_alias(NAME, packaging.CHAMPION).version)


def start_server(cmd: list[str], env: dict, cwd, log_path: Path, ready_url: str, timeout: float = 120.0):
    """Start ``cmd`` in its own process group; wait until ``ready_url`` answers 200."""
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log_file.close()
            raise AssertionError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(ready_url, timeout=2) as r:
                if r.status == 200:
                    return proc, log_file
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            stop_server(proc, log_file)
            raise AssertionError(f"server not ready after {timeout}s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)


def start_mlflow_server(tmp_path: Path, env: dict, artifacts: str | None = None):
    """A real ``mlflow server`` on a free 127.0.0.1 port, SQLite backend and artifacts under
    ``tmp_path/server`` (or at ``artifacts``, e.g. an s3:// URL: clients then upload and download
    through the server's proxy); job execution off keeps it to two processes. Returns
    ``(url, server_dir, proc, log_file)``; stop it with ``stop_server(proc, log_file)``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    proc, log_file = start_server(
        [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}",
         "--artifacts-destination", artifacts or str(server_dir / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        {**env, **TELEMETRY_OFF, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, server_dir, tmp_path / "server.log",
        f"{url}/health")
    return url, server_dir, proc, log_file


def stop_server(proc: subprocess.Popen, log_file) -> None:
    """SIGTERM the server's process group (it is the leader), SIGKILL it if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    except ProcessLookupError:
        pass
    finally:
        log_file.close()


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode("utf-8", "replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text


def child_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    # `mlflow models serve` execs `uvicorn` from PATH: the virtualenv's bin must be on it.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


# ------------------------------------------------------------------- the language model


def test_language_model_generates_from_raw_prefix(trained):
    lm = LanguageModel.from_dir(trained.runs["good"])
    text = lm.generate("Time Traveller", num_tokens=50)
    assert text.startswith("Time Traveller") and len(text) == len("Time Traveller") + 50
    # The prefix is normalized like the corpus: same continuation as the normalized prefix.
    assert text[len("Time Traveller"):] == lm.generate("time traveller", 50)[len("time traveller"):]
    sampled = [lm.generate("time traveller", 30, temperature=1.0, top_k=5, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    # Unknown prefix tokens are reported (the ab model knows only a, b and space).
    info = LanguageModel.from_dir(trained.runs["ab"]).generate_with_info("abc", 4)
    assert info.unknown == ["c"] and info.text.startswith("abc") and len(info.continuation) == 4
    with pytest.raises(ValueError, match="no tokens"):
        lm.generate("1234", 5)
    # Perplexity is the trainer's own validation figure, exactly (one evaluation setting).
    result = json.loads((Path(trained.runs["good"]) / "result.json").read_text())
    assert lm.perplexity(trained.tm.split("val")) == result["val_ppl"]


def test_language_model_load_errors_name_the_file(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained.runs["good"], run)
    (run / "model.pt").unlink()
    with pytest.raises(CheckpointError, match=r"model\.pt.*missing"):
        LanguageModel.from_dir(str(run))
    (run / "model.pt").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match=r"model\.pt.*cannot be loaded"):
        LanguageModel.from_dir(str(run))
    shutil.copy(Path(trained.runs["good"]) / "model.pt", run / "model.pt")
    (run / "lm.json").unlink()
    with pytest.raises(CheckpointError, match=r"lm\.json.*missing"):
        LanguageModel.from_dir(str(run))


def test_tracking_uri_defaults_and_db_creation(store, monkeypatch):
    from pipeline.errors import ConfigError

    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{Path(store).resolve() / 'mlflow.db'}"
    assert tracking.ensure_tracking_db() == uri == tracking.ensure_tracking_db()  # idempotent
    assert (Path(store) / "mlflow.db").is_file() and (Path(store) / "mlflow.db.lock").is_file()
    exp = tracking.get_or_create_experiment(tracking.client(), "rnnlm-x")
    assert tracking.client().get_experiment(exp).artifact_location == str(Path(store).resolve() / "mlartifacts" / "rnnlm-x")
    monkeypatch.setenv("RNNLM_STORAGE", "s3://bucket/rnnlm")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        tracking.tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


# ------------------------------------------------------------------------------ the gate


def test_gate_better_worse_better(trained):
    mid = log_and_register(trained, "mid", "flow-1")
    d1 = gate.promote_if_better(NAME, mid.version, trained.tm)
    assert d1.promoted and d1.champion_version is None and d1.split == "test"

    bad = log_and_register(trained, "bad", "flow-2")
    assert bad.test_ppl > mid.test_ppl  # the setup: "bad" really is worse
    d2 = gate.promote_if_better(NAME, bad.version, trained.tm)
    assert not d2.promoted and d2.champion_version == mid.version
    assert d2.champion_ppl == pytest.approx(mid.test_ppl) and d2.champion_ppl_source == "stored"
    assert champion_version() == mid.version

    good = log_and_register(trained, "good", "flow-3")
    assert good.test_ppl < mid.test_ppl
    d3 = gate.promote_if_better(NAME, good.version, trained.tm)
    assert d3.promoted and d3.champion_version == mid.version
    assert champion_version() == good.version

    c = tracking.client()
    mv = c.get_model_version(NAME, bad.version)
    assert mv.tags["gate.decision"] == "rejected"
    assert float(mv.tags["gate.candidate_ppl"]) == pytest.approx(bad.test_ppl)
    assert float(mv.tags["gate.champion_ppl"]) == pytest.approx(mid.test_ppl)
    assert "not promoted" in mv.description and f"v{mid.version}" in mv.description
    mv = c.get_model_version(NAME, good.version)
    assert mv.tags["gate.decision"] == "promoted" and "PROMOTED" in mv.description
    assert mv.tags["flow_run_id"] == "flow-3" and mv.tags["dataset_id"] == trained.tm.dataset_id
    assert str(c.get_model_version_by_alias(NAME, packaging.CHALLENGER).version) == good.version
    # A retried task logs and registers nothing new: same MLflow run, same version.
    again = log_and_register(trained, "good", "flow-3")
    assert (again.run_id, again.version) == (good.run_id, good.version)
    assert len(c.search_model_versions(f"name='{NAME}'")) == 3

    # The MLflow run of the last version: params, per-epoch metrics, artifacts, lineage.
    run = c.get_run(good.run_id)
    assert run.data.params["model.hidden_size"] == "32" and run.data.params["train.optimizer"] == "adam"
    assert run.data.params["data.sources.0.url"] == "builtin://timemachine"
    history = c.get_metric_history(good.run_id, "val_ppl")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert run.data.metrics["final_test_ppl"] == pytest.approx(good.test_ppl)
    tags = run.data.tags
    assert tags["prefect.flow_run_id"] == "flow-3" and tags["prefect.flow_run_url"].endswith("/flow-3")
    assert tags["data.dataset_id"] == trained.tm.dataset_id and len(tags["data.manifest_sha256"]) == 64
    assert tags["data.source.0.sha256"] == trained.tm.manifest["sources"][0]["sha256"]
    assert tags["code.version"]
    files = {a.path for a in c.list_artifacts(good.run_id)}
    assert {"perplexity.png", "samples.txt", "vocab.json", "manifest.json"} <= files
    png = Path(c.download_artifacts(good.run_id, "perplexity.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Nothing leaked into the process: MLflow's fluent URIs were scoped to each call.
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ


def test_gate_reevaluates_champion_trained_on_other_data(trained):
    # The setup: another dataset (more text), the same tokenizer and vocabulary, as a growing
    # corpus with a pinned vocabulary gives: comparable, but the stored figures are on other data.
    assert trained.ab.vocab.tokens == trained.ab2.vocab.tokens and trained.ab.dataset_id != trained.ab2.dataset_id
    ab = log_and_register(trained, "ab")
    assert gate.promote_if_better(NAME, ab.version, trained.ab).promoted
    ab2 = log_and_register(trained, "ab2")
    decision = gate.promote_if_better(NAME, ab2.version, trained.ab2)
    # The champion is re-evaluated on the current test split, and that figure decides.
    expected = LanguageModel.from_dir(trained.runs["ab"]).perplexity(trained.ab2.split("test"))
    assert decision.comparable and decision.champion_ppl_source == "re-evaluated"
    assert decision.champion_ppl == pytest.approx(expected, rel=1e-9)
    assert decision.promoted == (ab2.test_ppl < expected)
    assert champion_version() == (ab2.version if decision.promoted else ab.version)
    tags = tracking.client().get_model_version(NAME, ab2.version).tags
    assert float(tags["gate.champion_ppl"]) == pytest.approx(expected) and tags["gate.champion_ppl_source"] == "re-evaluated"

    # A champion with another vocabulary (a, b and space only) is not comparable on the Time
    # Machine: not re-scored with everything else as <unk>, and (by default) kept.
    mid = log_and_register(trained, "mid")
    decision = gate.promote_if_better(NAME, mid.version, trained.tm)
    assert not decision.comparable and not decision.promoted and decision.champion_ppl is None
    assert champion_version() != mid.version


# ---------------------------------------------------------------------- concurrency


WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from pipeline import errors
    from pipeline.registry import consumer, gate, packaging, run_logging, tracking
    from pipeline.config import RunConfig
    from pipeline.data.shards import open_dataset
    run_dir, dataset_uri, config_json, go = sys.argv[1:5]
    dataset = open_dataset(dataset_uri)
    config = RunConfig.model_validate_json(config_json)
    while not Path(go).exists():
        time.sleep(0.01)
    run_id = run_logging.log_training_run(run_dir, dataset, preset="test", config=config)
    mv = packaging.register_model(run_id, run_dir, name="rnnlm-test")
    decision = gate.promote_if_better(mv.name, mv.version, dataset)
    print(json.dumps({"version": mv.version, "test_ppl": mv.test_ppl, "promoted": decision.promoted}))
""")


def test_concurrent_registrations_get_distinct_versions(trained, tmp_path, store):
    from mlflow.exceptions import MlflowException

    go = tmp_path / "go"
    procs = {name: subprocess.Popen(
        [sys.executable, "-c", WORKER, trained.runs[name], trained.tm.uri,
         trained.config(name).model_dump_json(), str(go)],
        env=child_env(RNNLM_STORAGE=store), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("mid", "good")}
    out = {}
    try:
        with gate.gate_lock(NAME):  # hold the gate: both must register, then wait for it
            time.sleep(1.0)
            go.touch()  # both start logging at once, on a database neither has created yet
            deadline = time.monotonic() + 180
            while True:
                dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
                assert not dead, f"a worker ended while the gate was held: {dead} {procs[next(iter(dead))].stderr.read()[-3000:]}"
                db = Path(store) / "mlflow.db"
                if db.exists() and len(tracking.client().search_model_versions(f"name='{NAME}'")) == 2:
                    break
                assert time.monotonic() < deadline, "the workers did not register in time"
                time.sleep(0.5)
            time.sleep(1.0)
            assert all(p.poll() is None for p in procs.values())  # both blocked on the gate lock
            with pytest.raises(MlflowException):
                tracking.client().get_model_version_by_alias(NAME, packaging.CHAMPION)
        for name, p in procs.items():
            stdout, stderr = p.communicate(timeout=180)
            assert p.returncode == 0, f"{name} worker failed:\n{stderr[-4000:]}"
            out[name] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert {out["mid"]["version"], out["good"]["version"]} == {"1", "2"}
    assert out["good"]["test_ppl"] < out["mid"]["test_ppl"]
    assert out["good"]["promoted"]  # first (no champion) or second (beats mid): promoted either way
    assert champion_version() == out["good"]["version"]


REGISTER_ONE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from pipeline.registry import packaging
    run_id, run_dir, go = sys.argv[1:4]
    while not Path(go).exists():
        time.sleep(0.01)
    mv = packaging.register_model(run_id, run_dir, name="rnnlm-test")
    print(json.dumps({"version": mv.version, "created": mv.created}))
""")


def _mlflow_runs_of(trained: Trained, name: str, n: int) -> list[str]:
    """``n`` MLflow runs of one training run (distinct run keys: what two racing flows log)."""
    return [run_logging.log_training_run(trained.runs[name], trained.dataset(name), preset=PRESET,
                                         config=trained.config(name), run_key=f"race-{i}") for i in range(n)]


def _versions_of(run_dir: str) -> list:
    return [mv for mv in tracking.client().search_model_versions(f"name='{NAME}'") if mv.tags.get("run_dir") == run_dir]


def test_racing_processes_register_a_training_run_once(trained, tmp_path, store):
    """Two processes registering the same training run at once: one version, the other gets it."""
    run_ids = _mlflow_runs_of(trained, "mid", 2)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER_ONE, run_id, trained.runs["mid"], str(go)],
                              env=child_env(RNNLM_STORAGE=store), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for run_id in run_ids]
    try:
        time.sleep(1.0)
        go.touch()
        out = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stderr[-4000:]
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    versions = _versions_of(trained.runs["mid"])
    assert [str(mv.version) for mv in versions] == ["1"], [(mv.version, mv.run_id) for mv in versions]
    assert sorted(o["created"] for o in out) == [False, True]
    assert {o["version"] for o in out} == {"1"}


def test_racing_threads_register_a_training_run_once(trained):
    """The same inside one process (two flows' register tasks on threads)."""
    import concurrent.futures
    import threading

    run_ids = _mlflow_runs_of(trained, "mid", 2)
    barrier = threading.Barrier(2)

    def register(run_id: str) -> packaging.RegisteredVersion:
        barrier.wait()
        return packaging.register_model(run_id, trained.runs["mid"], name=NAME)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(register, run_ids))
    assert [str(mv.version) for mv in _versions_of(trained.runs["mid"])] == ["1"]
    assert sorted(mv.created for mv in got) == [False, True]
    assert {mv.version for mv in got} == {"1"}


# ------------------------------------------------------------- self-contained consumers


CONSUMER = textwrap.dedent("""
    # A consumer with only mlflow + torch: hide this project (its editable finder, and any
    # sys.path entry inside the checkout) and prove `import pipeline` fails before loading.
    import importlib, importlib.util, json, os, sys
    repo = os.path.realpath(sys.argv[1])
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                        and "editable" not in getattr(f, "__name__", "")]
    venv = os.path.realpath(sys.prefix)  # the virtualenv may live inside the checkout: keep it
    def in_checkout(p):
        p = os.path.realpath(p or os.getcwd())
        return (p == repo or p.startswith(repo + os.sep)) and not p.startswith(venv + os.sep)
    sys.path[:] = [p for p in sys.path if not in_checkout(p)]
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()
    assert importlib.util.find_spec("pipeline") is None, "the project is still importable"
    import mlflow
    model = mlflow.pyfunc.load_model(sys.argv[2])
    out = {
        "greedy": model.predict(["time traveller"], params={"num_tokens": 50, "seed": 0}),
        "sampled": model.predict(["Time Traveller", "the"], params={"num_tokens": 40, "temperature": 1.0,
                                                                  "top_k": 5, "seed": 7}),
        "pipeline_file": sys.modules["pipeline"].__file__,
        "pipeline_modules": sorted(m for m in sys.modules if m.startswith("pipeline")),
        "rnn": type(model.unwrap_python_model().lm.model.rnn).__name__,
    }
    print(json.dumps(out))
""")


def test_clean_process_loads_champion_and_matches(trained, tmp_path, store):
    mv = log_and_register(trained, "mid")  # trained with the scratch backend
    assert gate.promote_if_better(NAME, mv.version, trained.tm).promoted
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", CONSUMER, str(REPO), f"models:/{NAME}@champion"],
        env=child_env(MLFLOW_TRACKING_URI=tracking.tracking_uri()), cwd=elsewhere,
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "/code/pipeline/" in out["pipeline_file"] and str(REPO) not in out["pipeline_file"]
    shipped = {f"pipeline/{m}".removesuffix(".py").removesuffix("/__init__").replace("/", ".")
               for m in packaging.SHIPPED_MODULES}
    assert set(out["pipeline_modules"]) <= shipped
    assert out["rnn"] == "GRU"  # served with torch's GRU, whatever backend trained it

    lm = LanguageModel.from_dir(trained.runs["mid"], backend="torch")
    greedy = lm.generate("time traveller", 50, seed=0)
    assert out["greedy"] == [greedy] and len(greedy) == len("time traveller") + 50
    assert out["sampled"] == [lm.generate(p, 40, temperature=1.0, top_k=5, seed=7) for p in ("Time Traveller", "the")]
    # The same through the CLI helper, from the registry and from the run directory.
    assert consumer.generate_from_uri(f"models:/{NAME}@champion", "time traveller", 50, seed=0) == greedy
    assert consumer.generate_from_uri(trained.runs["mid"], "time traveller", 50) == \
        LanguageModel.from_dir(trained.runs["mid"]).generate("time traveller", 50)
    import pandas as pd
    from mlflow.exceptions import MlflowException

    model = load_champion(NAME)
    assert model.predict(pd.DataFrame({"prefix": ["time traveller"]}), params={"num_tokens": 50}) == [greedy]
    # predict is typed list[str]: MLflow validates the input itself, and no longer warns
    # "Add type hints to the `predict` method" on every load (printed by the clean process).
    assert "Add type hints" not in proc.stderr
    with pytest.raises(MlflowException, match="str"):
        model.predict(["time traveller", 3])


@pytest.mark.slow
def test_models_serve_invocations(trained, tmp_path, store):
    mv = log_and_register(trained, "good")
    gate.promote_if_better(NAME, mv.version, trained.tm)
    expected = LanguageModel.from_dir(trained.runs["good"]).generate("time traveller", 20, seed=0)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, log_file = start_server(
        [MLFLOW, "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        child_env(MLFLOW_TRACKING_URI=tracking.tracking_uri()), tmp_path, tmp_path / "serve.log", f"{url}/ping")
    try:
        inv = f"{url}/invocations"
        status, body = post(inv, json.dumps({"inputs": ["time traveller"],
                                             "params": {"num_tokens": 20, "seed": 0}}).encode())
        assert status == 200 and body == {"predictions": [expected]}
        status, body = post(inv, json.dumps({"dataframe_records": [{"prefix": "time traveller"}, {"prefix": "the"}],
                                             "params": {"num_tokens": 20}}).encode())
        assert status == 200 and body["predictions"][0] == expected and body["predictions"][1].startswith("the")
        for bad in (b"{not json", json.dumps({"prefixes": ["time traveller"]}).encode(),
                    json.dumps({"inputs": ["time traveller"], "params": {"num_tokens": -5}}).encode(),
                    json.dumps({"inputs": ["1234"]}).encode()):
            status, body = post(inv, bad)
            assert status == 400, (bad, status, body)
        # Several prefixes run as one batch: each gets what it gets alone.
        prefixes = ["time traveller", "the", "Time Traveller", "it was a dark night and the"]
        lm = LanguageModel.from_dir(trained.runs["good"])
        status, body = post(inv, json.dumps({"inputs": prefixes,
                                             "params": {"num_tokens": 20, "temperature": 1.0, "seed": 3}}).encode())
        assert status == 200 and body == {"predictions": [lm.generate(p, 20, temperature=1.0, seed=3) for p in prefixes]}
        # Requests over the limits, among good ones from 8 clients at once: each bad one gets its
        # 400 naming the limit, each good one its answer, and the server stays up.
        over = [({"inputs": ["time"], "params": {"num_tokens": MAX_NUM_TOKENS + 1}}, "num_tokens must be in"),
                ({"inputs": ["time"] * 5000}, "5,000 prefixes in one request"),
                ({"inputs": ["t" * 1_000_000]}, "prefix 0 has 1,000,000 characters")]
        good = ({"inputs": ["time traveller"], "params": {"num_tokens": 20, "seed": 0}}, None)
        requests = [good, *over] * 3
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda r: post(inv, json.dumps(r[0]).encode()), requests))
        for (_, problem), (status, body) in zip(requests, answers):
            if problem is None:
                assert status == 200 and body == {"predictions": [expected]}
            else:
                assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", (status, body)
                assert problem in body["message"], body
        with urllib.request.urlopen(f"{url}/ping", timeout=30) as r:
            assert r.status == 200
    finally:
        stop_server(proc, log_file)
    assert proc.returncode is not None


@pytest.mark.slow
def test_log_and_register_against_mlflow_server(trained, tmp_path, monkeypatch):
    url, server_dir, proc, log_file = start_mlflow_server(tmp_path, child_env())
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        assert tracking.tracking_uri() == url
        mv = log_and_register(trained, "good", "flow-srv")
        decision = gate.promote_if_better(NAME, mv.version, trained.tm)
        assert decision.promoted
        c = tracking.client()
        assert c.tracking_uri == url
        assert str(c.get_model_version_by_alias(NAME, "champion").version) == mv.version
        # Artifacts went through the server into its artifact store, not into our storage root.
        assert list((server_dir / "artifacts").rglob("perplexity.png"))
        assert list((server_dir / "artifacts").rglob("MLmodel"))
        assert not (Path(os.environ["RNNLM_STORAGE"]) / "mlflow.db").exists()
        got = load_champion(NAME).predict(["time traveller"], params={"num_tokens": 20, "seed": 0})
        assert got == [LanguageModel.from_dir(trained.runs["good"]).generate("time traveller", 20)]
    finally:
        stop_server(proc, log_file)


# ------------------------------------------------------------------------ failed runs


def test_failed_or_nan_training_registers_nothing(trained, tmp_path):
    tm = trained.tm
    diverged = str(tmp_path / "diverged")
    with pytest.raises(NonFiniteLossError):
        train(tm.split("train"), tm.split("val"), tm.vocab_size, ModelConfig(cell="rnn", hidden_size=16, embed_size=8),
              TrainConfig(epochs=1, batch_size=16, num_steps=20, lr=1e38, clip_norm=None, device="cpu"), diverged)
    assert (Path(diverged) / "FAILED.json").exists()

    nan_weights = tmp_path / "nan_weights"  # a run whose files claim success but whose weights are NaN
    shutil.copytree(trained.runs["good"], nan_weights)
    state = torch.load(nan_weights / "model.pt", weights_only=True)
    state["output.bias"] = torch.full_like(state["output.bias"], math.nan)
    torch.save(state, nan_weights / "model.pt")

    nan_result = tmp_path / "nan_result"  # result.json without a finite perplexity
    shutil.copytree(trained.runs["good"], nan_result)
    result = json.loads((nan_result / "result.json").read_text())
    (nan_result / "result.json").write_text(json.dumps({**result, "val_ppl": None}))

    good_run = run_logging.log_training_run(trained.runs["good"], tm, preset=PRESET, config=trained.config("good"))
    for run_dir in (diverged, str(nan_weights), str(nan_result)):
        with pytest.raises(errors.UnregistrableRunError, match="refusing"):
            run_logging.log_training_run(run_dir, tm, preset=PRESET, config=trained.config("good"))
        # Even handed a valid MLflow run id, registration refuses a failed run directory.
        with pytest.raises(errors.UnregistrableRunError, match="refusing"):
            packaging.register_model(good_run, run_dir, name=NAME)
    c = tracking.client()
    assert c.search_registered_models() == []
    assert c.search_model_versions(f"name='{NAME}'") == []
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert [r.info.run_id for r in runs] == [good_run]  # nothing logged for the failed directories
