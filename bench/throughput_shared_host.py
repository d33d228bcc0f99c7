"""The trainer beside a small neighbour: tokens/s with a process using 20% of one core vs alone.

The trainer runs as the pipeline runs it, through ``pipeline.training.launch.launch_training``, on
d2l's GRU (hidden 256, vocab 28, batch 32 x 35), ``STEPS`` steps per epoch, ``EPOCHS`` epochs;
the best epoch after the first counts. The neighbour busy-loops 2 ms out of every 10 ms.
Each of libgomp's waiting behaviours is measured alone and beside the neighbour, ``--repeats``
times interleaved (best of each): ``launcher default`` (whatever
``pipeline.training.launch.trainer_env`` chooses for the host at that moment), ``passive`` (sleep at once), ``spin 10k``
(``GOMP_SPINCOUNT=10000``) and ``spin 300k`` (libgomp's own default).

The launcher default's row says what it chose in each run (``chose``: spin or passive, alone and
beside). ``shared_host_ratio`` is the launcher default beside the neighbour over the *best* speed any
behaviour reaches alone (target >= 0.7), and ``quiet_host_ratio`` the launcher default alone
over that same best (what the default costs on a quiet host). Run it on an otherwise quiet
machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS, EPOCHS, BATCH, NUM_STEPS, VOCAB = 40, 4, 32, 35, 28
NEIGHBOUR = ("import time\n"
             "while True:\n"
             "    t = time.perf_counter()\n"
             "    while time.perf_counter() - t < 0.002: pass\n"
             "    time.sleep(0.008)\n")
# The launcher's own default first. The others set both variables, so the default cannot leak in;
# an explicit GOMP_SPINCOUNT is the spin count under either policy (with threads <= cores).
POLICIES = {"launcher default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"},
            "spin 10k": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000"},
            "spin 300k": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}}


class _Choices(logging.Handler):
    """The launcher's "OpenMP waiting: ..." log lines: which behaviour it chose for each run."""

    def __init__(self):
        super().__init__()
        self.chosen: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("OpenMP waiting:"):
            self.chosen.append("passive" if message.startswith("OpenMP waiting: passive") else "spin")

    @contextlib.contextmanager
    def recording(self):
        """Collect the launcher's choices made inside the ``with`` block."""
        launch_log = logging.getLogger("pipeline.training.launch")
        launch_log.setLevel(logging.INFO)
        launch_log.addHandler(self)
        try:
            yield
        finally:
            launch_log.removeHandler(self)


def train_tokens_per_s(workdir: Path, name: str, dataset: str, env: dict) -> float:
    from pipeline.config import ModelConfig, RunConfig, TrainConfig
    from pipeline.training.launch import launch_training

    config = RunConfig(model=ModelConfig(cell="gru", hidden_size=256),
                       train=TrainConfig(batch_size=BATCH, num_steps=NUM_STEPS, epochs=EPOCHS, device="cpu",
                                         keep_best=False))
    result = launch_training(str(workdir / name), dataset, config, env=env)
    epochs = [m for m in result.metrics if m.get("event") == "epoch"]
    return max(m["tokens_per_s"] for m in epochs[1:])


def shared_host_rows(repo: Path, repeats: int = 2) -> tuple[list[dict], float, float]:
    """Rows per waiting behaviour; ``shared_host_ratio`` and ``quiet_host_ratio`` (module docstring)."""
    import numpy as np

    alone = {policy: 0.0 for policy in POLICIES}
    beside = dict(alone)
    chosen = {"alone": _Choices(), "beside": _Choices()}  # what the launcher default chose, per run
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ids = np.random.default_rng(0).integers(0, VOCAB, STEPS * BATCH * NUM_STEPS + NUM_STEPS + 2_000)
        dataset = str(workdir / "data.npz")
        split = STEPS * BATCH * NUM_STEPS + NUM_STEPS
        np.savez(dataset, train=ids[:split].astype(np.int32), val=ids[split:].astype(np.int32),
                 vocab_size=np.int64(VOCAB))
        for rep in range(repeats):  # interleaved, best of each: a drift in the host's speed favours none
            for policy, extra in POLICIES.items():
                env = {"PYTHONPATH": str(repo), **extra}
                name = f"{policy.replace(' ', '-')}-{rep}"
                with chosen["alone"].recording():
                    alone[policy] = max(alone[policy], train_tokens_per_s(workdir, f"{name}-alone", dataset, env))
                neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
                try:
                    with chosen["beside"].recording():
                        beside[policy] = max(beside[policy],
                                             train_tokens_per_s(workdir, f"{name}-beside", dataset, env))
                finally:
                    neighbour.kill()  # by its PID: the only process this started
                    neighbour.wait()
    best_alone = max(alone.values())
    rows = [{"policy": policy, "alone_tokens_per_s": round(alone[policy]), "beside_tokens_per_s": round(beside[policy]),
             "beside_over_best_alone": round(beside[policy] / best_alone, 3),
             "alone_over_best_alone": round(alone[policy] / best_alone, 3),
             "threads": os.environ.get("RNNLM_NUM_THREADS", "all cores"), "chose": "(set)"} for policy in POLICIES]
    default = rows[0]
    # Only the default consults the host's load (the others set the variables themselves).
    default["chose"] = "; ".join(f"{where} {','.join(c.chosen)}" for where, c in chosen.items())
    return rows, default["beside_over_best_alone"], default["alone_over_best_alone"]
