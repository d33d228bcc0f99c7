"""The distributed retrain as production runs it: the Prefect server on a real PostgreSQL
(``PREFECT_API_DATABASE_CONNECTION_URL``), the workers on separate "hosts" (own PREFECT_HOME and
working directory) sharing only an S3 root (moto), MLflow behind ``mlflow server`` with its
artifacts on S3. The same checks as tests/test_deployments.py's SQLite / local-disk run."""

from __future__ import annotations

import pytest

from tests.servers import Processes, clean_env
from tests.test_deployments import check_nightly_retrain, start_stack
from tests.test_registry import start_mlflow_server, stop_server


@pytest.fixture(scope="module")
def s3_postgres_stack(tmp_path_factory, request, s3_server, postgres_url):
    base = tmp_path_factory.mktemp("deployments-s3")
    bucket = s3_server.new_bucket()
    env = s3_server.env
    mp = pytest.MonkeyPatch()  # this process reads the bucket too, to check what the workers wrote
    request.addfinalizer(mp.undo)
    for key, value in env.items():
        mp.setenv(key, value)
    url, _, mlflow_proc, mlflow_log = start_mlflow_server(base, clean_env(**env), artifacts=f"{bucket}/mlflow")
    request.addfinalizer(lambda: stop_server(mlflow_proc, mlflow_log))
    procs = Processes(base / "logs")
    request.addfinalizer(procs.stop_all)
    stack = start_stack(base, procs, store=f"{bucket}/rnnlm", tracking=url, database_url=postgres_url, env=env,
                        worker_homes=True)
    return {**stack, "database_url": postgres_url, "server_home": base / "server-home"}


def flow_runs_in(database_url: str) -> int:
    import asyncio

    import asyncpg

    async def count() -> int:
        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return await conn.fetchval("SELECT count(*) FROM flow_run")
        finally:
            await conn.close()

    return asyncio.run(count())


@pytest.mark.slow
def test_nightly_retrain_on_postgres_with_workers_sharing_only_s3(s3_postgres_stack):
    from pipeline import storage

    check_nightly_retrain(s3_postgres_stack)
    store = s3_postgres_stack["store"]
    fs, path = storage.filesystem(store)
    top = {k[len(path) + 1:].split("/")[0] for k in fs.find(path)}
    assert {"corpus", "datasets", "runs", "prefect-results"} <= top, top
    # the server kept its state in PostgreSQL (the parent and its two dispatched stages), not SQLite
    assert flow_runs_in(s3_postgres_stack["database_url"]) >= 3
    assert not list(s3_postgres_stack["server_home"].glob("*.db"))
