"""Two "hosts" start the same run at once, sharing only an S3 bucket (moto) and a Redis server:
each is a process with its own PREFECT_HOME (its own Prefect server and database) and working
directory, and no local disk in common. With ``options.redis_url`` every stage computes once:
for each stage, one host computes it and the other waits on the Redis lock, then finds the
first one's result on S3 (state ``Cached``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.servers import Processes, clean_env, require

HOST = textwrap.dedent("""
    import json, sys
    from flows.main import run_main

    summary = run_main("timemachine-char", sys.argv[1], ["data.splits.max_tokens=6000", "model.hidden_size=16",
                       "model.embed_size=8", "train.epochs=1", "train.max_minutes=null"],
                       options={"register_model": False, "redis_url": sys.argv[2], "sample_tokens": 5},
                       print_summary=False, sweep=sys.argv[3] if len(sys.argv) > 3 else None)
    print("STAGES " + json.dumps(summary["stages"]))
    if summary.get("sweep"):
        print("SWEEP " + json.dumps(summary["sweep"]))
""")


def start_hosts(tmp_path, s3_server, s3_root, redis_url, *extra: str) -> dict[str, dict]:
    """Both hosts' printed results (``STAGES``, ``SWEEP``), after both ran ``HOST`` to the end."""
    procs = Processes(tmp_path / "logs")
    try:
        hosts = []
        for name in ("host-a", "host-b"):
            home = tmp_path / name
            home.mkdir()
            env = clean_env(**s3_server.env, PREFECT_HOME=str(home / "prefect"), RNNLM_NUM_THREADS="1",
                            PREFECT_SERVER_ANALYTICS_ENABLED="false",
                            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
            hosts.append((name, procs.start(name, [sys.executable, "-c", HOST, s3_root, redis_url, *extra], env=env,
                                            cwd=home)))
        printed = {}
        for name, proc in hosts:
            assert proc.wait(timeout=600) == 0, procs.all_logs()
            lines = procs.log(name, tail=10**6).splitlines()
            printed[name] = {word: json.loads(ln[len(word) + 1:]) for word in ("STAGES", "SWEEP")
                             for ln in lines if ln.startswith(word + " ")}
    finally:
        procs.stop_all()
    return printed


@pytest.mark.slow
def test_two_hosts_starting_the_same_run_compute_every_stage_once(tmp_path, s3_server, s3_root, redis_url):
    require("prefect_redis")
    printed = start_hosts(tmp_path, s3_server, s3_root, redis_url)
    a, b = printed["host-a"]["STAGES"], printed["host-b"]["STAGES"]
    assert a.keys() == b.keys() and {"fetch_corpus", "write_shards", "train_model"} <= a.keys(), (a, b)
    for stage in a:
        assert len(a[stage]) == len(b[stage]), (stage, a[stage], b[stage])
        for x, y in zip(a[stage], b[stage]):
            assert sorted([x, y]) == ["Cached", "Completed"], (stage, a, b)  # computed by exactly one host
    assert not (tmp_path / "host-a" / ".rnnlm").exists() and not (tmp_path / "host-b" / ".rnnlm").exists()


@pytest.mark.slow
def test_two_hosts_running_the_same_sweep_split_its_trials_and_train_each_once(tmp_path, s3_server, s3_root,
                                                                                redis_url):
    require("prefect_redis")
    (tmp_path / "sweep.yaml").write_text("grid:\n  train.lr: [0.004, 0.002, 0.001, 0.0005]\ntrials_per_device: 4\n")
    printed = start_hosts(tmp_path, s3_server, s3_root, redis_url, str(tmp_path / "sweep.yaml"))
    a, b = (printed[h]["STAGES"]["train_model"] for h in ("host-a", "host-b"))
    assert len(a) == len(b) == 4
    # each trial's training is one task per host, in trial order: exactly one of the two hosts trained it
    assert all(sorted(pair) == ["Cached", "Completed"] for pair in zip(a, b)), (a, b)
    sweeps = [printed[h]["SWEEP"] for h in ("host-a", "host-b")]
    assert sweeps[0] == sweeps[1] and sweeps[0]["best"]  # one outcome, whichever host trained what
