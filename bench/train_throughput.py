"""Training throughput of pipeline.train against a minimal plain-PyTorch loop.

For each cell (rnn, gru, lstm), layer count and world size, one process (or one
torchrun job) trains the same model twice on the same sequential batches at
d2l's settings (batch 32, num_steps 35, hidden 256, vocab 28, SGD lr 1, clip 1):

* ``plain``: nn.Embedding + nn.RNN/GRU/LSTM + nn.Linear, the loop written out in
  a dozen lines (DDP-wrapped on 2 ranks), the loss summed on the device;
* ``trainer``: ``pipeline.train.train`` with everything it does per step.

Each runs one warm-up epoch and one timed epoch of ``--steps`` steps, the two
interleaved ``--repeats`` times, best of each kept; tokens/s is global (all ranks). The trainer's figure is its own epoch-2 ``tokens_per_s``
(validation and checkpointing happen outside that window, as they do outside
the plain loop).

The ``ray`` row (``--rows ray``; skipped if Ray is not installed) launches the same
trainer through ``pipeline.launch`` twice per repeat: 2 Ray Train workers on this
machine (``--ray-address local``: a private Ray started by the driver, so its
start-up is included) against ``torchrun --nproc-per-node 2``. It reports the
epoch-2 tokens/s ratio (ray / torchrun) and the fixed start-up cost of each launch:
launch wall time minus the trainer's own ``wall_s``. Prints a table, then one JSON line.

    python bench/train_throughput.py --steps 20 --cells gru --layers 1 --ranks 1,2 --device cpu
    python bench/train_throughput.py --rows ray --steps 50 --repeats 2 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB, BATCH, NUM_STEPS, HIDDEN = 28, 32, 35, 256


def plain_loop(cell: str, layers: int, ids, steps: int, init_state: dict, d) -> float:
    """The baseline: what one would write by hand. Returns tokens/s of the second epoch."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    class PlainLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(VOCAB, VOCAB)  # d2l's one-hot input, as a lookup
            self.rnn = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell](VOCAB, HIDDEN, layers, batch_first=True)
            self.output = nn.Linear(HIDDEN, VOCAB)

        def forward(self, X, state):
            out, state = self.rnn(self.embedding(X), state)
            return self.output(out), state

    model = PlainLM().to(d.device)
    model.load_state_dict(init_state)  # same init as the trainer's model (same parameter names)
    net = nn.parallel.DistributedDataParallel(model) if d.distributed else model
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    # d2l's sequential partition, this rank's rows of the global batch.
    rows = BATCH // d.world_size
    corpus = torch.from_numpy(ids).long()
    n = steps * NUM_STEPS
    Xs = corpus[: BATCH * n].reshape(BATCH, n)[d.rank * rows:(d.rank + 1) * rows]
    Ys = corpus[1: BATCH * n + 1].reshape(BATCH, n)[d.rank * rows:(d.rank + 1) * rows]

    def epoch() -> float:
        if d.distributed:
            dist.barrier()
        start, state, total = time.perf_counter(), None, torch.zeros((), device=d.device)
        for i in range(0, n, NUM_STEPS):
            X, Y = Xs[:, i:i + NUM_STEPS].to(d.device), Ys[:, i:i + NUM_STEPS].to(d.device)
            if state is not None:
                state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
            logits, state = net(X, state)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), Y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += loss.detach()
        total.item()  # wait for the device
        return BATCH * n / (time.perf_counter() - start)

    epoch()
    return epoch()


def worker(args) -> None:
    """Runs inside each rank: every (cell, layers) pair, plain then trainer."""
    import numpy as np
    import torch

    from pipeline.config import ModelConfig, TrainConfig
    from pipeline.models import build_model
    from pipeline.distributed import setup_distributed
    from pipeline.train import train

    d = setup_distributed(args.device)
    torch.manual_seed(0)
    tokens = args.steps * BATCH * NUM_STEPS + NUM_STEPS  # exactly --steps batches per epoch
    ids = np.random.default_rng(0).integers(0, VOCAB, tokens + 2_000).astype(np.int32)
    train_ids, val_ids = ids[:tokens], ids[tokens:]
    for cell in args.cells.split(","):
        for layers in (int(x) for x in args.layers.split(",")):
            model_cfg = ModelConfig(cell=cell, hidden_size=HIDDEN, num_layers=layers)
            cfg = TrainConfig(batch_size=BATCH, num_steps=NUM_STEPS, epochs=2, optimizer="sgd", lr=1.0,
                              clip_norm=1.0, device=args.device)
            torch.manual_seed(0)
            init = build_model(model_cfg, VOCAB).state_dict()
            plain, ours = 0.0, 0.0
            for rep in range(args.repeats):  # interleaved, best of each: the load on shared machines varies
                plain = max(plain, plain_loop(cell, layers, train_ids, args.steps, init, d))
                run_dir = Path(args.workdir) / f"{cell}-{layers}-{d.world_size}-{rep}"
                train(train_ids, val_ids, VOCAB, model_cfg, cfg, str(run_dir), dist_info=d)
                if d.is_main:
                    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
                    ours = max(ours, json.loads(lines[-1])["tokens_per_s"])
            if d.is_main:
                row = {"cell": cell, "layers": layers, "ranks": d.world_size, "tokens_per_s": round(ours),
                       "plain_tokens_per_s": round(plain), "ratio": round(ours / plain, 3)}
                print("BENCH " + json.dumps(row), flush=True)


def ray_row(args) -> dict:
    """Trainer tokens/s and start-up seconds: 2 Ray Train workers vs torchrun --nproc-per-node 2."""
    import numpy as np

    from pipeline.config import ModelConfig, RunConfig, TrainConfig
    from pipeline.launch import launch_training
    from pipeline.ray_launch import RayCluster

    cell = args.cells.split(",")[0]
    tokens = args.steps * BATCH * NUM_STEPS + NUM_STEPS
    ids = np.random.default_rng(0).integers(0, VOCAB, tokens + 2_000).astype(np.int32)
    cfg = RunConfig(model=ModelConfig(cell=cell, hidden_size=HIDDEN),
                    train=TrainConfig(batch_size=BATCH, num_steps=NUM_STEPS, epochs=2, optimizer="sgd", lr=1.0,
                                      clip_norm=1.0, device=args.device))
    env = {"PYTHONPATH": str(REPO), "RNNLM_NUM_THREADS": "1"}  # one thread per rank: 2 ranks, 2 cores
    best = {"torchrun": (0.0, float("inf")), "ray": (0.0, float("inf"))}  # (tokens/s, start-up s)
    with tempfile.TemporaryDirectory() as workdir:
        dataset = str(Path(workdir) / "data.npz")
        np.savez(dataset, train=ids[:tokens], val=ids[tokens:], vocab_size=VOCAB)
        for rep in range(args.repeats):  # interleaved, best of each
            for name, ray in (("torchrun", None), ("ray", RayCluster(address=args.ray_address, max_failures=0))):
                start = time.perf_counter()
                launched = launch_training(str(Path(workdir) / f"{name}-{rep}"), dataset, cfg, nproc=2, ray=ray,
                                           env=env)
                wall = time.perf_counter() - start
                tps = [m["tokens_per_s"] for m in launched.metrics if m.get("event") == "epoch"][-1]
                startup = wall - launched.result["wall_s"]
                best[name] = (max(best[name][0], tps), min(best[name][1], startup))
    (ray_tps, ray_start), (tr_tps, tr_start) = best["ray"], best["torchrun"]
    return {"launcher": "ray", "cell": cell, "ranks": 2, "tokens_per_s": round(ray_tps),
            "torchrun_tokens_per_s": round(tr_tps), "ratio": round(ray_tps / tr_tps, 3),
            "startup_s": round(ray_start, 1), "torchrun_startup_s": round(tr_start, 1)}


def trainer_rows(args) -> list[dict]:
    """The trainer against the plain loop, for every world size in --ranks."""
    rows = []
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as workdir:
        for ranks in (int(r) for r in args.ranks.split(",")):
            launcher = [sys.executable] if ranks == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
            cmd = [*launcher, __file__, "--worker", "--workdir", workdir, "--steps", str(args.steps),
                   "--cells", args.cells, "--layers", args.layers, "--device", args.device,
                   "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"worker failed ({ranks} ranks):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            rows += [json.loads(line[len("BENCH "):]) for line in proc.stdout.splitlines()
                     if line.startswith("BENCH ")]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50, help="steps per epoch (one warm-up + one timed epoch)")
    p.add_argument("--cells", default="rnn,gru,lstm")
    p.add_argument("--layers", default="1,2")
    p.add_argument("--ranks", default="1,2", help="world sizes to run, e.g. 1,2")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; the best of each counts")
    p.add_argument("--rows", default="trainer,ray", help="trainer (vs the plain loop), ray (vs torchrun)")
    p.add_argument("--ray-address", default="local", help="the Ray row's cluster: local, auto, ray://...")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    wanted = args.rows.split(",")
    rows = trainer_rows(args) if "trainer" in wanted else []
    ray = None
    if "ray" in wanted:
        try:
            import ray.train  # noqa: F401
        except ImportError:
            print("ray row skipped: Ray is not installed (pip install -e '.[ray]')", file=sys.stderr)
        else:
            ray = ray_row(args)

    if rows:
        print(f"{'cell':<5} {'layers':>6} {'ranks':>5} {'trainer tok/s':>14} {'plain tok/s':>12} {'ratio':>6}")
    for r in rows:
        print(f"{r['cell']:<5} {r['layers']:>6} {r['ranks']:>5} {r['tokens_per_s']:>14,} "
              f"{r['plain_tokens_per_s']:>12,} {r['ratio']:>6.3f}")
    if ray:
        print(f"ray   {ray['cell']} 2 workers: {ray['tokens_per_s']:,} tok/s vs torchrun {ray['torchrun_tokens_per_s']:,}"
              f" (ratio {ray['ratio']:.3f}); start-up {ray['startup_s']} s (torchrun {ray['torchrun_startup_s']} s)")
    print(json.dumps({"rows": rows, "ratio_min": min((r["ratio"] for r in rows), default=None), "ray": ray}))


if __name__ == "__main__":
    main()
