"""How a launcher and its trainer end together.

A SIGTERM to the launcher is forwarded to the trainer, which gets a grace period before
its whole process tree is killed (``Stopper``, ``stop_process_trees``); a launcher killed
outright (SIGKILL, OOM) cannot forward anything, so every trainer rank watches the
launcher's pid and stops itself once it is gone (``exit_with_launcher``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

log = logging.getLogger(__name__)

LAUNCHER_PID_ENV = "RNNLM_LAUNCHER_PID"
WATCH_EVERY_S = 0.2  # how often a trainer checks that its launcher is alive


class Stopper:
    """Forwards SIGTERM to the child; after ``grace_s`` kills the child's whole process tree."""

    def __init__(self, child: subprocess.Popen, grace_s: float):
        self.child, self.grace_s = child, grace_s
        self.signalled = False

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return None  # signal handlers live in the main thread; the caller's own cancel path applies
        return signal.signal(signal.SIGTERM, self._on_sigterm)

    def uninstall(self, previous) -> None:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    def redeliver(self, previous) -> None:
        """After the child is gone, let the SIGTERM do to us what it would have done."""
        if callable(previous):
            previous(signal.SIGTERM, None)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True
        threading.Thread(target=self.stop, daemon=True).start()

    def stop(self) -> None:
        """SIGTERM the child (torchrun passes it on to its workers), wait, then SIGKILL the tree."""
        try:
            stop_process_trees([psutil.Process(self.child.pid)], self.grace_s)
        except psutil.NoSuchProcess:
            pass


def stop_process_trees(roots: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM each root, wait up to ``grace_s`` for the roots to exit, then SIGKILL every
    process of their trees (as found before the SIGTERM).

    torchrun forwards the SIGTERM to its workers and waits for them, so waiting on the
    roots gives every rank its grace; workers that run in sessions of their own are then
    killed one by one. A root is never reaped here (that is its parent's ``wait``).
    """
    trees = []
    for root in roots:
        try:
            trees.append([root, *root.children(recursive=True)])
            root.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(root) for root in roots):
        time.sleep(0.1)
    for tree in trees:
        for proc in tree:
            try:
                proc.kill()  # psutil checks the pid still names the same process
            except psutil.NoSuchProcess:
                pass


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def exit_now(code: int) -> None:
    """Flush the output and end the process with ``code`` at once, skipping the interpreter's
    finalization (atexit handlers, garbage collection of what is left)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def exit_with_launcher() -> None:
    """In a trainer started by ``launch_training``: SIGTERM ourselves once the launcher is gone.

    A killed launcher (SIGKILL, OOM) cannot forward anything; without this its trainer
    would go on training unobserved, its output going nowhere. Every rank watches (the
    launcher's pid reaches them through torchrun's environment), so torchrun sees its
    workers end and exits too. Metric lines are written whole before they are printed,
    so ``metrics.jsonl`` keeps every finished epoch.
    """
    pid = os.environ.get(LAUNCHER_PID_ENV)
    if not pid:
        return
    try:
        launcher = psutil.Process(int(pid))
    except (psutil.NoSuchProcess, ValueError):
        launcher = None

    def watch() -> None:
        while launcher is not None and _alive(launcher):  # a zombie launcher is gone too
            time.sleep(WATCH_EVERY_S)
        log.warning("the launcher (pid %s) is gone: stopping", pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()
