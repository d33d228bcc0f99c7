"""Stopping a trainer's process tree: one function for the launcher and the Prefect task."""

from __future__ import annotations

import subprocess
import sys

import psutil

from pipeline.training.processes import stop_process_trees

# A root that starts a grandchild in a session of its own (as torchrun's workers are),
# which ignores SIGTERM: only the SIGKILL after the grace period stops it.
ROOT = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
    start_new_session=True, stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(600)
"""


def test_stop_process_trees_kills_every_process_of_the_tree():
    root = subprocess.Popen([sys.executable, "-c", ROOT], stdout=subprocess.PIPE, text=True)
    grandchild = None
    try:
        grandchild = psutil.Process(int(root.stdout.readline()))
        stop_process_trees([psutil.Process(root.pid)], grace_s=30.0)
        assert root.wait(timeout=30) != 0  # it died of the SIGTERM, well before the grace ran out
        grandchild.wait(timeout=30)  # raises TimeoutExpired if it survived
        assert not grandchild.is_running()
    finally:
        for p in (root.pid, grandchild.pid if grandchild else None):
            if p is not None and psutil.pid_exists(p):
                try:
                    psutil.Process(p).kill()
                except psutil.NoSuchProcess:
                    pass
        root.wait()
