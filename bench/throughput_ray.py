"""The trainer on Ray Train against torchrun: 2 workers on this machine, tokens/s and start-up.

Both launches go through ``pipeline.training.launch.launch_training``, as the pipeline runs them, on
d2l's GRU (hidden 256, vocab 28, batch 32 x 35, SGD lr 1, clip 1), ``steps`` steps an epoch,
two epochs (the second is timed, by the trainer's own ``tokens_per_s``), interleaved
``repeats`` times, best of each kept. The epochs are long (``--ray-steps``, 400 by default,
about 13 s here) because for the first seconds after a launch Ray is still starting its own
actors (the Train controller and its helpers, a dozen Python processes on 2 cores): with
50-step epochs (1.6 s) the timed epoch fell inside that and Ray scored 0.83 of torchrun, with
400-step epochs 1.01 (this machine, best of 3 each). Launchers:

* ``torchrun``: ``torchrun --standalone --nproc-per-node 2``;
* ``ray``: ``pipeline.training.ray_launch`` with 2 Ray Train workers at ``address`` (``local``: a
  private Ray that the driver starts, so Ray's own start-up is part of the figure).

``ray_ratio`` is ray over torchrun tokens/s (target >= 0.9 on CPU); ``ray_startup_s`` is the
fixed cost of a Ray launch: its wall time minus the trainer's own ``wall_s`` (torchrun's
figure is beside it). Needs the ``ray`` extra; run it on an otherwise quiet machine.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

BATCH, NUM_STEPS, VOCAB, HIDDEN = 32, 35, 28, 256


def ray_rows(repo: Path, *, steps: int, repeats: int, device: str, address: str = "local") -> tuple[list[dict], float]:
    """One row per launcher (best tokens/s, best start-up seconds); returns (rows, ray/torchrun ratio)."""
    import numpy as np

    from pipeline.config import ModelConfig, RunConfig, TrainConfig
    from pipeline.training.launch import launch_training
    from pipeline.training.ray_launch import RayCluster

    config = RunConfig(model=ModelConfig(cell="gru", hidden_size=HIDDEN),
                       train=TrainConfig(batch_size=BATCH, num_steps=NUM_STEPS, epochs=2, optimizer="sgd", lr=1.0,
                                         clip_norm=1.0, device=device, keep_best=False))
    env = {"PYTHONPATH": str(repo), "RNNLM_NUM_THREADS": "1"}  # 2 ranks, one thread each
    launchers = {"torchrun": None, "ray": RayCluster(address=address, max_failures=0)}
    best = {name: (0.0, float("inf")) for name in launchers}  # (tokens/s, start-up s)
    with tempfile.TemporaryDirectory() as tmp:
        split = steps * BATCH * NUM_STEPS + NUM_STEPS  # exactly `steps` batches an epoch
        ids = np.random.default_rng(0).integers(0, VOCAB, split + 2_000).astype(np.int32)
        dataset = str(Path(tmp) / "data.npz")
        np.savez(dataset, train=ids[:split], val=ids[split:], vocab_size=np.int64(VOCAB))
        for rep in range(repeats):  # interleaved: the load on a shared machine varies
            for name, ray in launchers.items():
                start = time.perf_counter()
                launched = launch_training(str(Path(tmp) / f"{name}-{rep}"), dataset, config, nproc=2, ray=ray,
                                           env=env)
                wall = time.perf_counter() - start
                tokens_per_s = [m["tokens_per_s"] for m in launched.metrics if m.get("event") == "epoch"][-1]
                startup = wall - launched.result["wall_s"]
                best[name] = (max(best[name][0], tokens_per_s), min(best[name][1], startup))
    rows = [{"launcher": name, "workers": 2, "tokens_per_s": round(tps), "startup_s": round(startup, 1)}
            for name, (tps, startup) in best.items()]
    return rows, round(best["ray"][0] / best["torchrun"][0], 3)


def ray_section(repo: Path, args, print_rows) -> dict:
    """train_throughput.py's ``ray`` section: its JSON fields (none without the ``ray`` extra)."""
    try:
        import ray.train  # noqa: F401
    except ImportError:
        print("ray section skipped: needs the ray extra (pip install -e '.[ray]')", file=sys.stderr)
        return {}
    rows, ratio = ray_rows(repo, steps=args.ray_steps, repeats=args.repeats, device=args.device, address=args.ray_address)
    print_rows("Ray Train (2 workers) vs torchrun --nproc-per-node 2", rows)
    return {"ray_rows": rows, "ray_ratio": ratio, "ray_startup_s": rows[1]["startup_s"]}
