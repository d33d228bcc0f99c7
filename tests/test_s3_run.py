"""The whole ``rnnlm run`` with its storage root on S3 (moto's server on 127.0.0.1) and MLflow
artifacts on S3 behind a real ``mlflow server``: every artifact lands in the bucket, nothing on
local disk, and a clean process with only the tracking URL loads the registered model."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pipeline import storage
from tests.servers import clean_env
from tests.test_cli import RNNLM
from tests.test_registry import start_mlflow_server, stop_server


TINY = ["--set", "data.splits.max_tokens=6000", "--set", "model.hidden_size=16", "--set", "model.embed_size=8",
        "--set", "train.epochs=1", "--set", "train.max_minutes=null"]


@pytest.mark.slow
def test_rnnlm_run_with_the_root_on_s3(tmp_path, s3_server, s3_root):
    bucket = s3_root.rsplit("/", 1)[0]
    # the embedded Prefect server keeps its SQLite database under PREFECT_HOME (a local disk)
    env = clean_env(**s3_server.env, RNNLM_NUM_THREADS="1", PYTHONUNBUFFERED="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    url, server_dir, proc, log_file = start_mlflow_server(tmp_path, env, artifacts=f"{bucket}/mlflow")
    try:
        work = tmp_path / "work"
        work.mkdir()
        run = subprocess.run([RNNLM, "run", "--root", s3_root, *TINY], cwd=work, capture_output=True, text=True,
                             timeout=600, env={**env, "MLFLOW_TRACKING_URI": url, "PREFECT_HOME": str(tmp_path / "ph")})
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
        assert "registered        rnnlm-timemachine-char version 1 (champion)" in run.stdout, run.stdout

        fs, path = storage.filesystem(s3_root)
        keys = [k[len(path) + 1:] for k in fs.find(path)]
        top = {k.split("/")[0] for k in keys}
        assert {"corpus", "datasets", "runs", "prefect-results"} <= top, sorted(top)
        assert any(k.startswith("datasets/") and k.endswith("/manifest.json") for k in keys)
        for name in ("metrics.jsonl", "result.json", "model.pt", "lm.json"):
            assert any(k.startswith("runs/") and k.endswith("/" + name) for k in keys), name
        assert any("/checkpoints/ckpt-" in k for k in keys)
        assert not [k for k in keys if ".tmp-" in k]  # no staging leftovers
        assert not list(work.iterdir()), list(work.iterdir())  # nothing on the local disk
        mlflow_keys = fs.find(bucket[len("s3://"):] + "/mlflow")
        assert any(k.endswith("/MLmodel") for k in mlflow_keys), mlflow_keys[:20]

        # A consumer with only the tracking URL (no S3 credentials: the server proxies artifacts)
        consumer = textwrap.dedent(f"""
            import mlflow
            mlflow.set_tracking_uri("{url}")
            model = mlflow.pyfunc.load_model("models:/rnnlm-timemachine-char@champion")
            print(repr(model.predict(["time traveller"], params={{"num_tokens": 20, "seed": 0}})[0]))
        """)
        out = subprocess.run([sys.executable, "-c", consumer], cwd=tmp_path, env=clean_env(), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-4000:]
        text = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr
        assert text.startswith("time traveller") and len(text) == len("time traveller") + 20
    finally:
        stop_server(proc, log_file)
