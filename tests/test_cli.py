"""The `rnnlm` command as users run it: subprocesses in an empty directory, no storage env.

The main job runs on a small slice (hidden 32, one epoch) so it takes seconds of training,
but everything else is the real thing: Prefect's own local server, MLflow on SQLite under
`./.rnnlm/`, or a real `mlflow server` on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_registry import start_mlflow_server, stop_server

RNNLM = str(Path(sys.executable).with_name("rnnlm"))
SMALL = ["--set", "data.splits.max_tokens=20000", "--set", "model.hidden_size=32", "--set", "model.embed_size=16",
         "--set", "train.epochs=1", "--set", "train.max_minutes=null"]


def env(**extra) -> dict[str, str]:
    """The user's environment: no storage root, no tracking server, no Prefect server."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("RNNLM_STORAGE", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME", "PYTHONPATH")}
    e.update(RNNLM_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return e


def rnnlm(*args: str, cwd: Path, check: bool = True, **extra) -> subprocess.CompletedProcess:
    proc = subprocess.run([RNNLM, *args], cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"rnnlm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_prepare_prints_the_d2l_numbers(tmp_path):
    out = rnnlm("prepare", cwd=tmp_path).stdout
    summary = json.loads(out[out.index("{"):])
    assert summary["num_tokens"] == 170_580 and summary["vocab_size"] == 28
    assert sum(summary["splits"].values()) == 170_580
    assert (tmp_path / ".rnnlm" / "datasets" / summary["dataset_id"] / "manifest.json").is_file()


def test_bad_input_exits_do_not_retry_naming_the_problem(tmp_path):
    missing = rnnlm("prepare", "--set", "data.sources=[{url: /no/such/corpus.txt}]", cwd=tmp_path, check=False)
    assert missing.returncode == 3 and "/no/such/corpus.txt" in missing.stderr and "not found" in missing.stderr
    typo = rnnlm("prepare", "--set", "train.learning_rate=0.1", cwd=tmp_path, check=False)
    assert typo.returncode == 3 and "learning_rate" in typo.stderr
    preset = rnnlm("prepare", "--config", "no-such-preset", cwd=tmp_path, check=False)
    assert preset.returncode == 3 and "timemachine-char" in preset.stderr  # lists the real presets


def test_a_bad_sweep_fails_before_anything_starts_naming_the_trial_and_key(tmp_path):
    (tmp_path / "sweep.yaml").write_text("grid:\n  train.lr: [0.01, -1]\n")
    bad_value = rnnlm("run", "--sweep", "sweep.yaml", cwd=tmp_path, check=False)
    assert bad_value.returncode == 3, bad_value.stderr
    assert re.search(r"rnnlm: error: .*sweep trial t01-\w+.*train\.lr", bad_value.stderr)
    (tmp_path / "typo.yaml").write_text("grid:\n  train.lr: [0.01]\ntrials_per_gpu: 2\n")
    typo = rnnlm("run", "--sweep", "typo.yaml", cwd=tmp_path, check=False)
    assert typo.returncode == 3 and "trials_per_gpu" in typo.stderr and "typo.yaml" in typo.stderr
    assert not (tmp_path / ".rnnlm" / "runs").exists() and not (tmp_path / ".rnnlm" / "datasets").exists()


def test_train_then_generate_from_the_run_directory(tmp_path):
    out = rnnlm("train", *SMALL, cwd=tmp_path).stdout
    run_dir = json.loads(out[out.rindex("{\n"):])["run_dir"]
    assert Path(run_dir).parent == tmp_path / ".rnnlm" / "runs"
    text = rnnlm("generate", "--run", run_dir, "--prefix", "Time Traveller", "--num-tokens", "30", cwd=tmp_path).stdout
    text = text.rstrip("\n")  # generated text may end in spaces: only print's newline goes
    assert text.startswith("Time Traveller") and len(text) == len("Time Traveller") + 30


@pytest.mark.slow
def test_run_in_an_empty_directory_registers_a_champion_and_reruns_from_cache(tmp_path):
    first = rnnlm("run", *SMALL, cwd=tmp_path).stdout
    assert "registered        rnnlm-timemachine-char version 1 (champion)" in first, first
    assert re.search(r"perplexity\s+validation \d+\.\d+, test \d+\.\d+", first)
    db = tmp_path / ".rnnlm" / "mlflow.db"
    assert db.is_file() and (tmp_path / ".rnnlm" / "prefect").is_dir()

    second = rnnlm("run", *SMALL, cwd=tmp_path).stdout
    cached = re.search(r"\((\d+)/(\d+) stages from cache\)", second)
    assert cached and cached.group(1) == cached.group(2), second

    # A consumer with only mlflow (and torch) loads the champion from the SQLite registry.
    consumer = textwrap.dedent(f"""
        import mlflow
        mlflow.set_tracking_uri("sqlite:///{db}")
        model = mlflow.pyfunc.load_model("models:/rnnlm-timemachine-char@champion")
        print(repr(model.predict(["time traveller"], params={{"num_tokens": 50, "seed": 0}})[0]))
    """)
    out = subprocess.run([sys.executable, "-c", consumer], cwd=tmp_path / "..", env=env(), capture_output=True,
                         text=True, timeout=300, check=True).stdout
    text = eval(out.strip().splitlines()[-1])  # noqa: S307 - our own repr
    assert text.startswith("time traveller") and len(text) == len("time traveller") + 50


@pytest.mark.slow
def test_run_against_a_real_mlflow_server(tmp_path):
    import psutil

    url, server_dir, proc, log_file = start_mlflow_server(tmp_path, env())
    try:
        assert psutil.Process(proc.pid).environ().get("MLFLOW_DISABLE_TELEMETRY") == "true"  # no phoning home
        work = tmp_path / "work"
        work.mkdir()
        out = rnnlm("run", *SMALL, cwd=work, MLFLOW_TRACKING_URI=url).stdout
        assert "registered        rnnlm-timemachine-char version 1 (champion)" in out, out
        assert not (work / ".rnnlm" / "mlflow.db").exists()  # the server holds the registry
        assert list((server_dir / "artifacts").rglob("MLmodel"))
        text = rnnlm("generate", "--model", "models:/rnnlm-timemachine-char@champion", "--prefix", "time traveller",
                     "--num-tokens", "20", cwd=work, MLFLOW_TRACKING_URI=url).stdout.rstrip("\n").splitlines()[-1]
        assert text.startswith("time traveller") and len(text) == len("time traveller") + 20
    finally:
        stop_server(proc, log_file)


# ------------------------------------------------------------------- one-line verdicts


def small_run_dir(path: Path, normalizer: str) -> Path:
    """A run directory with an untrained model over 'a'-'z' and space: enough to generate from."""
    from pipeline.config import ModelConfig, TokenizerConfig
    from pipeline.model.lm import LanguageModel
    from pipeline.model.models import build_model

    vocab = ["<unk>", " ", *"abcdefghijklmnopqrstuvwxyz"]
    model = build_model(ModelConfig(cell="gru", hidden_size=8, embed_size=4), len(vocab))
    LanguageModel(model, vocab, TokenizerConfig(level="char", normalizer=normalizer)).save(str(path))
    return path


@pytest.mark.parametrize("args, problem", [
    (["--prefix", ""], "prefix ''"),
    (["--prefix", "time", "--num-tokens", "-5"], "num_tokens"),
    (["--prefix", "time", "--temperature", "-1"], "temperature"),
    (["--prefix", "1984"], "no tokens"),  # digits only: nothing left after d2l normalization
])
def test_bad_generation_input_is_one_line_and_not_retried(tmp_path, args, problem):
    run_dir = small_run_dir(tmp_path / "run", "d2l")
    proc = rnnlm("generate", "--run", str(run_dir), *args, cwd=tmp_path, check=False)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rnnlm: error:") and problem in last, proc.stderr


def test_unknown_prefix_tokens_are_read_as_unk_with_a_warning(tmp_path):
    run_dir = small_run_dir(tmp_path / "run", "none")
    proc = rnnlm("generate", "--run", str(run_dir), "--prefix", "时间机器 time", "--num-tokens", "5", cwd=tmp_path)
    assert proc.stdout.startswith("时间机器 time")
    warning = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert warning and "4 of its 9 tokens are not in the model's vocabulary" in warning[0], proc.stderr
    assert "<unk>" in warning[0] and "'时'" in warning[0]


@pytest.mark.slow
def test_failed_run_ends_with_one_line_verdict_and_runs_servers_without_telemetry(tmp_path):
    """A failing `rnnlm run`: Prefect's tracebacks go to the log file, the terminal ends with the
    verdict; its embedded Prefect server (a child process) runs with every telemetry switch off."""
    import psutil

    missing = tmp_path / "no-such-corpus.txt"
    proc = subprocess.Popen([RNNLM, "run", "--set", f"data.sources=[{{url: {missing}}}]"], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server_env = None
    try:
        while proc.poll() is None and server_env is None:  # the server lives as long as the run
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if "uvicorn" in " ".join(child.cmdline()):
                        server_env = child.environ()
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.05)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, err
    assert server_env is not None, "no Prefect server process seen"
    switches = ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY")
    assert [str(server_env.get(k)).lower() for k in switches] == ["false", "true", "true"], server_env
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("rnnlm: error: corpus source") and str(missing) in last and "not found" in last, err
    log_file = Path(re.search(r"\(full log: (.+)\)$", last).group(1))
    assert log_file.parent == tmp_path / ".rnnlm" / "logs"
    assert "Traceback" in log_file.read_text() and str(missing) in log_file.read_text()

    verbose = rnnlm("--verbose", "run", "--set", f"data.sources=[{{url: {missing}}}]", cwd=tmp_path, check=False)
    assert verbose.returncode == 3 and "Traceback" in verbose.stderr


def test_pin_vocab_champion_and_an_explicit_pin_conflict(tmp_path):
    pinned = rnnlm("run", "--pin-vocab", "champion", "--set", "data.vocab.pinned=/some/dataset", *SMALL,
                   cwd=tmp_path, check=False)
    assert pinned.returncode == 3 and "--pin-vocab champion" in pinned.stderr and "/some/dataset" in pinned.stderr
    bad = rnnlm("run", "--pin-vocab", "latest", cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "champion" in bad.stderr  # argparse names the one choice


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_sigterm_to_run_leaves_no_process_of_the_run(tmp_path):
    """SIGTERM (what timeout, systemd, Kubernetes send) mid-training does what Ctrl-C does: the
    temporary Prefect server and the trainer end with the run, checked by PID."""
    import signal

    import psutil

    with open(tmp_path / "out.log", "wb") as out, open(tmp_path / "err.log", "wb") as err:
        proc = subprocess.Popen([RNNLM, "run", *SMALL, "--set", "train.epochs=50"], cwd=tmp_path, env=env(),
                                stdout=out, stderr=err)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 400
        while not any("pipeline.training" in " ".join(p.cmdline()) for p in seen.values() if p.is_running()):
            assert proc.poll() is None, (tmp_path / "err.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            for child in _descendants(proc.pid):
                try:
                    child.cmdline()
                    seen.setdefault(child.pid, child)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.1)
        assert any("uvicorn" in " ".join(p.cmdline()) for p in seen.values()), "no temporary Prefect server seen"
        time.sleep(2.0)  # a few steps in
        seen.update({c.pid: c for c in _descendants(proc.pid)})
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=120)
        gone, alive = psutil.wait_procs(list(seen.values()), timeout=30)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
        assert returncode == 128 + signal.SIGTERM
        last = (tmp_path / "err.log").read_text().strip().splitlines()[-1]
        assert last.startswith("rnnlm: error: stopped by SIGTERM"), last
    finally:
        for p in [proc, *seen.values()]:
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        proc.wait()
