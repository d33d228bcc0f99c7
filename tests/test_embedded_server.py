"""The temporary Prefect server of ``rnnlm run`` (``flows.servers.EmbeddedServer``): it answers
on its API URL with its database in the home it was given, and it never outlives its process."""

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


@pytest.mark.slow
def test_the_embedded_server_serves_from_its_home_and_dies_with_its_process(tmp_path):
    import httpx

    home = tmp_path / "prefect-home"
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(home)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = None
    try:
        server = psutil.Process(int(starter.stdout.readline()))
        url = starter.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert (home / "prefect.db").is_file()
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
