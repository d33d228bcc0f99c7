"""The temporary Prefect server of ``rnnlm run`` (``flows.servers.EmbeddedServer``): it answers
on its API URL with its database in the home it was given, a new home starts from a migrated
template database, and the server never outlives its process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

STARTER = textwrap.dedent("""
    import sys, time
    from flows.servers import embedded_server
    server = embedded_server(sys.argv[1])
    print(server.proc.pid, flush=True)
    print(server.wait_ready(), flush=True)
    assert embedded_server(sys.argv[1]) is server  # one per process
    time.sleep(600)
""")


def start_and_kill(home, cache, check_before_ready=lambda: None) -> None:
    """Start a server in a child process, check it answers, SIGKILL the child: the server must go too."""
    import httpx

    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(home)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(cache)})
    server = None
    try:
        server = psutil.Process(int(starter.stdout.readline()))
        check_before_ready()
        url = starter.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert httpx.post(f"{url}/block_types/filter", json={}, timeout=10).json()  # registered block types
        assert httpx.post(f"{url}/flow_runs/filter", json={}, timeout=10).json() == []
        assert server.environ()["PREFECT_HOME"] == str(home)

        starter.send_signal(signal.SIGKILL)  # no atexit, no handler: only the kernel can stop the server now
        starter.wait(10)
        server.wait(20)  # raises TimeoutExpired if the server outlived its process
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
        if server is not None and server.is_running():
            server.kill()


@pytest.mark.slow
def test_the_embedded_server_starts_from_a_template_and_dies_with_its_process(tmp_path):
    from flows.servers import PREFECT_DB

    cache = tmp_path / "cache"
    start_and_kill(tmp_path / "home-1", cache)  # a fresh database: migrated by Prefect, then kept
    [template] = (cache / "rnnlm").iterdir()
    assert (template / PREFECT_DB).is_file()

    home = tmp_path / "home-2"
    start_and_kill(home, cache, check_before_ready=lambda: (home / PREFECT_DB).is_file() or pytest.fail(
        "the new home did not start from the template"))
