"""The registry gate, fail-closed and like for like, and idempotent registration (issue 10).

Real MLflow: SQLite in each test's storage root, or a real ``mlflow server`` behind a small
fault-injecting HTTP proxy (a real network failure of chosen registry reads: the server
keeps running, the proxy answers 503 for them). Models are tiny GRUs trained once per module.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import urllib.parse
from pathlib import Path

import pytest

from pipeline.registry import gate, packaging, run_logging, tracking
from pipeline.config import DataConfig, ModelConfig, RunConfig, SplitConfig, TrainConfig, VocabConfig
from pipeline.errors import RegistryUnavailableError
from pipeline.model.lm import LanguageModel, write_lm_metadata
from pipeline.data.prepare import prepare_dataset
from pipeline.training.train import train
from tests.test_registry import child_env, start_mlflow_server, stop_server

FULL = DataConfig(splits=SplitConfig(max_tokens=12_000))  # 28 tokens
SMALL = DataConfig(splits=SplitConfig(max_tokens=12_000), vocab=VocabConfig(min_freq=6000))  # 13: more <unk>
MODEL = ModelConfig(cell="gru", hidden_size=32, embed_size=16)
GOOD = TrainConfig(epochs=3, batch_size=16, num_steps=20, optimizer="adam", lr=0.01, device="cpu")
BAD = TrainConfig(epochs=1, batch_size=16, num_steps=20, optimizer="sgd", lr=0.01, device="cpu")


class Runs:
    def __init__(self, base: Path):
        store = str(base / "store")
        self.full, self.small = prepare_dataset(FULL, store), prepare_dataset(SMALL, store)
        self.data = {"good": FULL, "bad": FULL, "small": SMALL}
        self.dirs = {"good": self._train(base, "good", self.full, GOOD), "bad": self._train(base, "bad", self.full, BAD),
                     "small": self._train(base, "small", self.small, GOOD)}

    @staticmethod
    def _train(base: Path, name: str, dataset, cfg: TrainConfig) -> str:
        run_dir = str(base / "runs" / name)
        train(dataset.split("train"), dataset.split("val"), dataset.vocab_size, MODEL, cfg, run_dir)
        write_lm_metadata(run_dir, dataset)
        return run_dir

    def dataset(self, name: str):
        return self.small if name == "small" else self.full

    def register(self, name: str, model: str, run_key: str | None = None) -> packaging.RegisteredVersion:
        cfg = RunConfig(data=self.data[name], model=MODEL, train=BAD if name == "bad" else GOOD)
        run_id = run_logging.log_training_run(self.dirs[name], self.dataset(name), preset="test", config=cfg,
                                              samples=["x"], run_key=run_key)
        return packaging.register_model(run_id, self.dirs[name], name=model)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("gate"))


def champion(model: str) -> str | None:
    aliases = tracking.client().get_registered_model(model).aliases
    return None if "champion" not in aliases else str(aliases["champion"])


# ---------------------------------------------------------------------- like for like


def test_smaller_vocabulary_champion_is_not_comparable(runs):
    small = runs.register("small", "rnnlm-lfl")
    assert gate.promote_if_better("rnnlm-lfl", small.version, runs.small).promoted
    good = runs.register("good", "rnnlm-lfl")
    # The bug: scored on the candidate's test split, the small-vocabulary champion
    # predicts <unk> for every rare letter and "wins" an easier task.
    easier = LanguageModel.from_dir(runs.dirs["small"]).perplexity(runs.full.split("test"),
                                                                   vocab_tokens=runs.full.vocab.tokens)
    assert easier < good.test_ppl

    d = gate.promote_if_better("rnnlm-lfl", good.version, runs.full)
    assert not d.promoted and not d.comparable and d.on_incomparable == "keep"
    assert d.reason.startswith("not comparable") and "vocabulary" in d.reason and f"v{small.version} kept" in d.reason
    assert d.champion_ppl is None and champion("rnnlm-lfl") == small.version
    mv = tracking.client().get_model_version("rnnlm-lfl", good.version)
    assert mv.tags["gate.comparable"] == "false" and mv.tags["gate.decision"] == "rejected"
    assert "not comparable" in mv.tags["gate.reason"] and "not comparable" in mv.description

    # The policy can promote anyway (a fresh model name: a version is gated once).
    small2, good2 = runs.register("small", "rnnlm-lfl2"), runs.register("good", "rnnlm-lfl2")
    gate.promote_if_better("rnnlm-lfl2", small2.version, runs.small)
    d = gate.promote_if_better("rnnlm-lfl2", good2.version, runs.full, on_incomparable="promote")
    assert d.promoted and not d.comparable and "promoted anyway" in d.reason
    assert champion("rnnlm-lfl2") == good2.version


def test_gate_config_section():
    assert RunConfig().gate.on_incomparable == "keep"
    assert RunConfig.model_validate({"gate": {"on_incomparable": "promote"}}).gate.on_incomparable == "promote"
    with pytest.raises(ValueError, match="on_incomparable"):
        RunConfig.model_validate({"gate": {"on_incomparable": "maybe"}})
    with pytest.raises(ValueError, match="extra"):
        RunConfig.model_validate({"gate": {"on_incomparible": "keep"}})


# ------------------------------------------------------------------------- idempotent


def test_repeated_registration_registers_nothing_new(runs):
    first = runs.register("good", "rnnlm-idem")
    assert first.created
    d1 = gate.promote_if_better("rnnlm-idem", first.version, runs.full)
    c = tracking.client()
    before = c.get_model_version("rnnlm-idem", first.version)
    # Logged again under another run key (a new MLflow run of the same run directory):
    # the same training run, the same weights: no second version, and the gate is not re-run.
    again = runs.register("good", "rnnlm-idem", run_key="another-key")
    assert again.run_id == first.run_id and again.version == first.version and not again.created
    d2 = gate.promote_if_better("rnnlm-idem", again.version, runs.full)
    assert d2.decided_before and not d1.decided_before
    assert (d2.promoted, d2.reason, d2.candidate_ppl) == (d1.promoted, d1.reason, d1.candidate_ppl)
    after = c.get_model_version("rnnlm-idem", first.version)
    assert after.description == before.description and after.tags["gate.time"] == before.tags["gate.time"]
    assert len(c.search_model_versions("name='rnnlm-idem'")) == 1


# ------------------------------------------------------------------------ fail closed


class FaultyProxy:
    """An HTTP proxy to ``upstream`` that answers 503 to requests ``fail(method, path)`` picks."""

    def __init__(self, upstream: str):
        target = urllib.parse.urlsplit(upstream)
        proxy = self
        self.fail = lambda method, path: False

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.fail(self.command, urllib.parse.urlsplit(self.path).path):
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def faulty_server(tmp_path, monkeypatch):
    url, _, proc, log_file = start_mlflow_server(tmp_path, child_env())
    proxy = FaultyProxy(url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after minutes of backoff
    try:
        yield proxy
    finally:
        proxy.close()
        stop_server(proc, log_file)


def champion_and_worse_candidate(runs: Runs, model: str) -> tuple[str, str]:
    good = runs.register("good", model)
    assert gate.promote_if_better(model, good.version, runs.full).promoted
    bad = runs.register("bad", model)
    assert bad.test_ppl > good.test_ppl  # the setup: "bad" must never become champion
    return good.version, bad.version


@pytest.mark.slow
def test_registry_failure_during_gate_moves_no_alias(runs, faulty_server):
    # 1. The champion alias lookup fails: that is not "no champion".
    good, bad = champion_and_worse_candidate(runs, "rnnlm-fc")
    faulty_server.fail = lambda method, path: method == "GET" and path.endswith("/registered-models/alias")
    try:
        decision = gate.promote_if_better("rnnlm-fc", bad, runs.full)
        assert not decision.promoted  # this gate reads the champion another way, and it worked
    except RegistryUnavailableError:
        pass
    faulty_server.fail = lambda method, path: False
    assert champion("rnnlm-fc") == good

    # 2. Every read of the registered model fails (its aliases included): the gate fails,
    # retryable, having moved and recorded nothing; the retry decides properly.
    good, bad = champion_and_worse_candidate(runs, "rnnlm-fc2")
    faulty_server.fail = lambda method, path: method == "GET" and "/registered-models/" in path
    with pytest.raises(RegistryUnavailableError) as info:
        gate.promote_if_better("rnnlm-fc2", bad, runs.full)
    assert info.value.retryable
    faulty_server.fail = lambda method, path: False
    assert champion("rnnlm-fc2") == good
    assert "gate.decision" not in tracking.client().get_model_version("rnnlm-fc2", bad).tags
    assert not gate.promote_if_better("rnnlm-fc2", bad, runs.full).promoted
    assert champion("rnnlm-fc2") == good

    # 3. A failed version search is not "not registered yet": retrying the registration fails
    # (retryable) instead of registering the same training run a second time.
    faulty_server.fail = lambda method, path: method == "GET" and path.endswith("/model-versions/search")
    with pytest.raises(RegistryUnavailableError):
        runs.register("bad", "rnnlm-fc2")
    faulty_server.fail = lambda method, path: False
    assert len(tracking.client().search_model_versions("name='rnnlm-fc2'")) == 2


@pytest.mark.slow
def test_unreachable_registry_fails_retryable(runs, faulty_server):
    good = runs.register("good", "rnnlm-down")
    faulty_server.fail = lambda method, path: True  # the server is unreachable
    with pytest.raises(RegistryUnavailableError) as info:
        gate.promote_if_better("rnnlm-down", good.version, runs.full)
    assert info.value.retryable
    faulty_server.fail = lambda method, path: False
    assert champion("rnnlm-down") is None
