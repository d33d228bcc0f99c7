"""The Prefect flows end to end, against a real (temporary) Prefect server on SQLite.

Tiny inputs: a ~3 KB corpus file cut in 1 KB chunks (so the map stages really map), a
GRU of 16 units, 2 epochs. Task-run states are read back from the Prefect API.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

pytestmark = pytest.mark.slow

TEXT = (
    "The Time Traveller (for so it will be convenient to speak of him) was expounding a\n"
    "recondite matter to us. His grey eyes shone and twinkled, and his usually pale face\n"
    "was flushed and animated. The fire burned brightly, and the soft radiance of the\n"
    "incandescent lights in the lilies of silver caught the bubbles that flashed and passed\n"
    "in our glasses.\n"
) * 8

DATA_STAGES = ("fetch_corpus", "count_tokens", "build_vocab", "encode_shards", "write_shards")
TRAIN_STAGES = ("train_model", "evaluate_model")


@pytest.fixture(scope="module", autouse=True)
def prefect_server(tmp_path_factory):
    """One temporary Prefect server (SQLite) for the module, PREFECT_HOME in a temp dir, telemetry off."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.servers import TELEMETRY_OFF

    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as env:
        for name, value in TELEMETRY_OFF.items():
            env.setenv(name, value)
        with temporary_settings(updates={PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
            with prefect_test_harness(server_startup_timeout=120):
                yield


def corpus(tmp_path: Path, text: str = TEXT) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def run_config(path: Path, **train):
    from pipeline.config import RunConfig

    return RunConfig.model_validate({
        "data": {"sources": [{"url": str(path)}], "tokenizer": {"level": "char"}, "chunk_bytes": 1024},
        "model": {"cell": "gru", "hidden_size": 16, "embed_size": 8, "init": "default"},
        "train": {"batch_size": 4, "num_steps": 8, "epochs": 2, "optimizer": "adam", "lr": 0.01, **train},
    })


def options(store: str, **kw):
    from tasks.options import PipelineOptions

    kw.setdefault("register_model", False)  # registration has its own test below and in tests/test_registry.py
    return PipelineOptions(root=store, sample_tokens=10, fetch_retry_delay_s=0.05, train_retry_delay_s=0, grace_s=5, **kw)


def task_runs(flow_run_ids) -> dict[str, list]:
    """Task runs of the given flow runs, by task name, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids))))
    out: dict[str, list] = {}
    for r in runs:
        name = r.name.rsplit("-", 1)[0]
        if name in DATA_STAGES + TRAIN_STAGES:  # not the placeholder task runs of subflows
            out.setdefault(name, []).append(r)
    return out


def states(result) -> dict[str, list[str]]:
    runs = task_runs([result["flow_run_id"], *result.get("subflow_run_ids", [])])
    return {name: sorted(r.state_name for r in rs) for name, rs in runs.items()}


def retrain(cfg, store, **kw):
    from flows.retrain import retrain_flow

    started = time.perf_counter()
    result = retrain_flow(config=cfg, options=options(store, **kw))
    result["test_wall_s"] = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------------ tests


def test_retrain_completes_then_reruns_from_cache_and_invalidates_precisely(tmp_path, store):
    from pipeline.data.prepare import prepare_dataset
    from pipeline.data.shards import open_dataset

    path = corpus(tmp_path)
    cfg = run_config(path)

    first = retrain(cfg, store)
    s = states(first)
    assert set(s) == set(DATA_STAGES + TRAIN_STAGES)
    assert len(s["count_tokens"]) == len(s["encode_shards"]) >= 3  # the corpus really is mapped over chunks
    assert all(n == "Completed" for names in s.values() for n in names), s
    ds = first["dataset"]
    assert ds["num_tokens"] > 1000 and first["run"]["epochs"] == 2
    assert first["evaluation"]["val_ppl"] > 1 and first["evaluation"]["test_ppl"] > 1
    assert len(first["evaluation"]["samples"]) == 2 and Path(first["run"]["model_uri"]).is_file()
    # the chunked, mapped flow writes exactly what the one-process pipeline writes
    direct = prepare_dataset(cfg.data, str(tmp_path / "direct"))
    flowed = open_dataset(ds["uri"])
    assert direct.dataset_id == ds["dataset_id"]
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(direct.split(split), flowed.split(split))

    second = retrain(cfg, store)
    print(f"\nfirst run {first['test_wall_s']:.1f} s, fully cached re-run {second['test_wall_s']:.1f} s")
    s = states(second)
    assert set(s) == set(DATA_STAGES + TRAIN_STAGES)
    assert all(n == "Cached" for names in s.values() for n in names), s
    assert second["evaluation"] == first["evaluation"] and second["run"]["run_dir"] == first["run"]["run_dir"]

    # only a training setting changed: every data stage is reused, training and evaluation recompute
    third = retrain(run_config(path, lr=0.02), store)
    s = states(third)
    assert all(n == "Cached" for st in DATA_STAGES for n in s[st]), s
    assert s["train_model"] == ["Completed"] and s["evaluate_model"] == ["Completed"], s
    assert third["run"]["run_dir"] != first["run"]["run_dir"]

    # one byte of the corpus changed (same size): every stage recomputes
    text = path.read_bytes()
    i = text.index(b"grey")
    path.write_bytes(text[:i] + b"G" + text[i + 1:])
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a coarse-mtime filesystem still sees it
    fourth = retrain(cfg, store)
    s = states(fourth)
    assert all(n == "Completed" for names in s.values() for n in names), s
    assert fourth["dataset"]["dataset_id"] != ds["dataset_id"]


def test_deleted_dataset_is_recomputed_not_a_dangling_cache_hit(tmp_path, store):
    import shutil

    from flows.prepare_data import prepare_data_flow

    cfg = run_config(corpus(tmp_path))
    first = prepare_data_flow(data=cfg.data, options=options(store))
    shutil.rmtree(first["uri"])
    second = prepare_data_flow(data=cfg.data, options=options(store))
    s = states(second)
    assert s["write_shards"] == ["Completed"], s  # the stale record was dropped
    assert all(n == "Cached" for st in DATA_STAGES[:-1] for n in s[st]), s
    assert second["uri"] == first["uri"] and (Path(second["uri"]) / "manifest.json").is_file()

    # an intermediate deleted: that chunk re-encodes, the rest stay cached
    os.remove(_encoded_uris(store)[0])
    third = prepare_data_flow(data=cfg.data, options=options(store))
    assert sorted(states(third)["encode_shards"]).count("Completed") == 1


def test_corrupt_cached_dataset_is_quarantined_and_rebuilt(tmp_path, store):
    """The cache check verifies a cached dataset: one whose shard fails its sha256 is moved to
    <root>/quarantine/ and rebuilt from the cached encoded chunks, not returned as a cache hit."""
    from flows.prepare_data import prepare_data_flow
    from pipeline.data.shards import open_dataset

    data = run_config(corpus(tmp_path)).data.model_copy(update={"tokens_per_shard": 500})
    first = prepare_data_flow(data=data, options=options(store))
    ids = open_dataset(first["uri"]).split("train").copy()
    shard = Path(first["uri"]) / "train-00001.parquet"
    broken = bytearray(shard.read_bytes())
    broken[len(broken) // 2] ^= 0x01
    shard.write_bytes(bytes(broken))
    second = prepare_data_flow(data=data, options=options(store))
    s = states(second)
    assert s["write_shards"] == ["Completed"], s
    assert all(n == "Cached" for st in DATA_STAGES[:-1] for n in s[st]), s
    assert second["uri"] == first["uri"] and np.array_equal(open_dataset(second["uri"]).split("train"), ids)
    [moved] = (Path(store) / "quarantine" / "datasets").iterdir()
    assert (moved / shard.name).read_bytes() == bytes(broken)


@pytest.mark.parametrize("level", ["char", "word", "named splits", "pinned vocabulary"])
def test_flow_and_prepare_dataset_write_byte_identical_datasets(tmp_path, store, level):
    """One data chain: the mapped flow and the in-process ``prepare_dataset`` write the same bytes."""
    import json
    import shutil

    from flows.prepare_data import prepare_data_flow
    from pipeline.config import DataConfig, SourceConfig
    from pipeline.data.prepare import prepare_dataset

    if level == "named splits":  # PTB-style files, vocabulary counted on train only
        ptb = Path(__file__).parent / "fixtures" / "ptb"
        data = DataConfig.model_validate({
            "sources": [{"url": str(ptb / f"ptb.{name}.txt"), "split": split}
                        for name, split in (("valid", "val"), ("train", "train"), ("test", "test"))],
            "tokenizer": {"level": "word", "normalizer": "none", "eos": True},
            "chunk_bytes": 1024, "tokens_per_shard": 100, "splits": {"max_tokens": 500}})
    else:
        data = run_config(corpus(tmp_path)).data.model_copy(update={"tokens_per_shard": 100})
        tokenizer = data.tokenizer.model_copy(update={"level": "word" if level == "word" else "char"})
        data = data.model_copy(update={"tokenizer": tokenizer})
    if level == "pinned vocabulary":  # char level, a smaller corpus's vocabulary: unseen characters become <unk>
        (tmp_path / "small").mkdir()
        smaller = data.model_copy(update={"sources": (SourceConfig(url=str(corpus(tmp_path / "small", "the time\n"))),)})
        pin = prepare_dataset(smaller, str(tmp_path / "elsewhere")).uri
        data = DataConfig.model_validate({**data.model_dump(mode="json"), "vocab": {"pinned": pin}})

    def files(uri: str) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(uri).iterdir())}

    direct = prepare_dataset(data, store)
    direct_files, direct_manifest = files(direct.uri), json.loads((Path(direct.uri) / "manifest.json").read_text())
    assert len([f for f in direct_files if f.startswith("train-")]) >= 2  # several shards, so chunk order matters
    shutil.rmtree(direct.uri)  # same root, so the manifests' corpus paths agree too

    flowed = prepare_data_flow(data=data, options=options(store))
    assert flowed["uri"] == direct.uri and len(states(flowed)["count_tokens"]) >= 3
    assert files(flowed["uri"]) == direct_files
    assert json.loads((Path(flowed["uri"]) / "manifest.json").read_text()) == direct_manifest


def _encoded_uris(store: str) -> list[str]:
    return sorted(str(p) for p in (Path(store) / "work" / "encoded").glob("*.parquet"))


def test_two_identical_runs_started_together_compute_each_stage_once(tmp_path, store):
    cfg = run_config(corpus(tmp_path))
    results, errors = [], []

    def go():
        try:
            results.append(retrain(cfg, store))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(results) == 2
    a, b = states(results[0]), states(results[1])
    for stage in DATA_STAGES + TRAIN_STAGES:
        both = a[stage] + b[stage]
        assert both.count("Completed") == len(a[stage]), (stage, a[stage], b[stage])  # computed once per item
        assert both.count("Cached") == len(b[stage]), (stage, a[stage], b[stage])
    assert results[0]["evaluation"] == results[1]["evaluation"]


def test_killed_training_rank_is_retried_and_resumes_from_checkpoint(tmp_path, store):
    cfg = run_config(corpus(tmp_path), epochs=3, checkpoint_every_steps=10)  # killed mid-epoch
    killed: list[int] = []

    def assassin():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if list(Path(store).glob("runs/*/checkpoints/ckpt-*.pt")):
                for p in psutil.Process().children(recursive=True):
                    try:
                        if "pipeline.training.train" in p.cmdline():
                            p.send_signal(signal.SIGKILL)
                            killed.append(p.pid)
                    except psutil.NoSuchProcess:
                        pass
            time.sleep(0.02)

    watcher = threading.Thread(target=assassin, daemon=True)
    watcher.start()
    result = retrain(cfg, store)
    watcher.join(5)
    assert killed, "the trainer finished before it could be killed"
    run = result["run"]
    assert run["resumed_from"] is not None and run["resumed_from"]["step"] >= 10, run  # from the checkpoint
    assert run["epochs"] == 3 and run["finished"]
    runs = task_runs(result["subflow_run_ids"])
    assert [r.run_count for r in runs["train_model"]] == [2]
    assert runs["train_model"][0].state_name == "Completed"


def test_unreachable_source_is_retried_then_fails_clearly(tmp_path, store):
    import socket

    from flows.prepare_data import prepare_data_flow
    from pipeline.config import DataConfig

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/corpus.txt"
    data = DataConfig.model_validate({"sources": [{"url": url}]})
    state = prepare_data_flow(data=data, options=options(store, fetch_retries=2), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception) as info:
        state.result()
    assert url in str(info.value) and "unreachable" in str(info.value)
    runs = task_runs([state.state_details.flow_run_id])["fetch_corpus"]
    assert [r.run_count for r in runs] == [3]  # 1 + 2 retries


def test_checksum_mismatch_fails_at_once_naming_the_source(tmp_path, store):
    from flows.prepare_data import prepare_data_flow
    from pipeline.config import DataConfig

    path = corpus(tmp_path)
    wrong = hashlib.sha256(b"something else").hexdigest()
    data = DataConfig.model_validate({"sources": [{"url": str(path), "sha256": wrong}]})
    state = prepare_data_flow(data=data, options=options(store, fetch_retries=3), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception) as info:
        state.result()
    assert str(path) in str(info.value) and "checksum mismatch" in str(info.value)
    runs = task_runs([state.state_details.flow_run_id])["fetch_corpus"]
    assert [r.run_count for r in runs] == [1]


def test_map_stages_on_a_local_dask_cluster(tmp_path, store):
    from flows.prepare_data import prepare_data_flow
    from flows.task_runners import task_runner_for
    from pipeline.data.prepare import prepare_dataset

    opts = options(store, dask="local-threads")
    runner = task_runner_for(opts)
    assert type(runner).__name__ == "DaskTaskRunner"
    cfg = run_config(corpus(tmp_path))
    result = prepare_data_flow.with_options(task_runner=runner)(data=cfg.data, options=opts)
    s = states(result)
    assert len(s["count_tokens"]) >= 3 and all(n == "Completed" for names in s.values() for n in names), s
    assert result["dataset_id"] == prepare_dataset(cfg.data, str(tmp_path / "direct")).dataset_id


def test_a_lock_left_by_a_dead_process_is_broken_not_waited_on(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    from tasks.caching import lock_manager
    from tasks.options import PipelineOptions

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    manager = lock_manager(PipelineOptions(locks=str(tmp_path / "locks")))
    (tmp_path / "locks").mkdir()
    stale = tmp_path / "locks" / "train-abc.lock"
    stale.write_text(json.dumps({"holder": f"{socket.gethostname()}:{dead.pid}:1:MainThread", "expiration": None}))
    assert not manager.is_locked("train-abc") and not stale.exists()
    assert manager.acquire_lock("train-abc", holder="me", acquire_timeout=1)
    assert manager.is_locked("train-abc")  # a live holder (this process) still blocks others
    assert not manager.acquire_lock("train-abc", holder="someone-else", acquire_timeout=0.3)


def test_retrain_registers_a_champion_with_lineage(tmp_path, store):
    """The whole chain ends in the registry: a version with lineage tags, alias champion."""
    from mlflow.tracking import MlflowClient

    from pipeline.registry.tracking import tracking_uri

    cfg = run_config(corpus(tmp_path))
    result = retrain(cfg, store, register_model=True)
    reg = result["registered"]
    assert reg["registered"] and reg["name"] == "rnnlm-custom" and reg["gate"]["promoted"]
    client = MlflowClient(tracking_uri(store))
    champion = client.get_model_version_by_alias("rnnlm-custom", "champion")
    assert str(champion.version) == reg["version"]
    run = client.get_run(champion.run_id)
    assert run.data.tags["prefect.flow_run_id"] == result["flow_run_id"]
    assert run.data.tags["data.dataset_id"] == result["dataset"]["dataset_id"]
    assert float(champion.tags["test_ppl"]) > 1
    # One evaluation (batch 4 x 8 training, the fixed evaluation setting everywhere): the trainer's
    # figure, the evaluate task's, MLflow's metric and the version's tag are one number.
    val, test = result["run"]["val_ppl"], result["evaluation"]["test_ppl"]
    assert result["evaluation"]["val_ppl"] == val == run.data.metrics["final_val_ppl"] == float(champion.tags["val_ppl"])
    assert run.data.metrics["final_test_ppl"] == test == float(champion.tags["test_ppl"])
    assert reg["new_version"] and not reg["gate"]["decided_before"]

    # The same inputs again (every stage cached): nothing new is registered, and the result says so.
    again = retrain(cfg, store, register_model=True)["registered"]
    assert (again["version"], again["new_version"], again["gate"]["decided_before"]) == (reg["version"], False, True)
    assert len(client.search_model_versions("name='rnnlm-custom'")) == 1


def test_registration_holds_the_limit_every_host_shares(tmp_path, store):
    """Hosts with no disk in common register a training run once: "already registered?" and the
    registration happen under the one-slot Prefect limit the gate uses. While another holder has
    the slot, the register task registers nothing; once it is free, it registers."""
    import threading

    from prefect.concurrency.sync import concurrency

    from pipeline.registry.tracking import client
    from tasks.register import GATE_LIMIT, ensure_gate_limit, register_model

    cfg = run_config(corpus(tmp_path))
    result = retrain(cfg, store)
    ensure_gate_limit()
    out = {}

    def register() -> None:
        out["registered"] = register_model(result["run"], result["evaluation"], result["dataset"],
                                           cfg.model_dump(mode="json"), preset="custom", root=store)

    worker = threading.Thread(target=register)
    c = client(store)
    with concurrency(GATE_LIMIT, occupy=1, strict=True):  # another host, registering
        worker.start()
        deadline = time.monotonic() + 120
        while not c.search_runs([e.experiment_id for e in c.search_experiments()]):  # logged: next, registering
            assert worker.is_alive() and time.monotonic() < deadline
            time.sleep(0.5)
        for _ in range(40):  # time enough to log the model and register it, were it not waiting
            assert c.search_model_versions("name='rnnlm-custom'") == []
            time.sleep(0.5)
        assert worker.is_alive()
    worker.join(timeout=300)
    assert out["registered"]["new_version"] and out["registered"]["version"] == "1"


def test_the_test_server_runs_with_telemetry_off():
    servers = [p for p in psutil.Process().children(recursive=True) if "uvicorn" in " ".join(p.cmdline())]
    assert servers, "no Prefect server process"
    env = servers[0].environ()
    switches = ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY")
    assert [str(env.get(k)).lower() for k in switches] == ["false", "true", "true"]  # Prefect writes 'False'


def test_a_missing_local_input_is_not_retried_and_named(tmp_path):
    from prefect import flow, task

    from tasks.retries import retry_if_retryable

    missing = tmp_path / "gone" / "counts.json"
    attempts = []

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=retry_if_retryable)
    def read(path: str) -> str:
        attempts.append(path)
        with open(path) as f:
            return f.read()

    @flow
    def reader() -> str:
        return read(str(missing))

    state = reader(return_state=True)
    assert state.is_failed() and len(attempts) == 1, attempts
    with pytest.raises(FileNotFoundError, match=str(missing)):
        state.result()


def test_stage_keys_follow_the_project_code_they_run(tmp_path, store, monkeypatch):
    """Editing a module a stage runs recomputes that stage and everything downstream; nothing else."""
    import shutil

    from pipeline import code_version

    src = tmp_path / "src"  # a copy of the project the digests read, so the test can edit it
    for package in ("pipeline", "tasks"):
        shutil.copytree(code_version.SOURCE_ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.txt"))  # not the bundled corpus
    monkeypatch.setattr(code_version, "SOURCE_ROOT", src)

    def edit(module: str) -> None:
        with open(src / module, "a", encoding="utf-8") as f:
            f.write("\n# an upgrade\n")
        code_version.clear_cache()

    cfg = run_config(corpus(tmp_path))
    first_result = retrain(cfg, store)
    first = states(first_result)
    assert all(n == "Completed" for names in first.values() for n in names), first
    encoded = _encoded_uris(store)

    unchanged = states(retrain(cfg, store))
    assert all(n == "Cached" for names in unchanged.values() for n in names), unchanged

    edit("pipeline/registry/gate.py")
    registry_changed = states(retrain(cfg, store))
    assert all(n == "Cached" for names in registry_changed.values() for n in names), registry_changed

    edit("pipeline/data/tokenizer.py")
    upgraded = retrain(cfg, store)
    tokenizer_changed = states(upgraded)
    # ... into a new dataset and a new run: the old code's artifacts are neither reused nor resumed
    assert upgraded["dataset"]["dataset_id"] != first_result["dataset"]["dataset_id"]
    assert upgraded["run"]["run_dir"] != first_result["run"]["run_dir"]
    assert tokenizer_changed["fetch_corpus"] == ["Cached"], tokenizer_changed  # fetching runs no tokenizer
    for stage in DATA_STAGES[1:] + TRAIN_STAGES:
        assert all(n == "Completed" for n in tokenizer_changed[stage]), (stage, tokenizer_changed)
    assert len(_encoded_uris(store)) == 2 * len(encoded)  # new intermediates, the old ones untouched
