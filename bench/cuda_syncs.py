"""Host waits and kernel launches per training step on a GPU, counted with torch.profiler.

    PYTHONPATH=. python bench/cuda_syncs.py                 # d2l's GRU, eager step
    PYTHONPATH=. python bench/cuda_syncs.py --cuda-graphs   # the step replayed as a CUDA graph

Trains d2l's GRU (batch 32 x 35, hidden 256, 28 tokens, SGD lr 1, clipping) with
pipeline.training.train for an epoch of ``--steps`` steps and again for twice as many; the
difference between the two runs, divided by ``--steps``, is what one step costs (validation,
checkpoints and start-up cancel out). Counted:

* with torch.profiler, CUDA activity only (the runtime calls and kernels, not every operator:
  a GRU step is thousands of operator events), the runtime calls that make the host wait for
  the device (``*Synchronize``, a blocking ``cudaMemcpy``) and the kernel or graph launches;
* with ``torch.cuda.set_sync_debug_mode("warn")``, the synchronizing operations torch flags
  (``.item()``, a copy to pageable host memory, ``nonzero``...) by the Python line that asked.

Without CUDA it says so and prints nulls. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
         "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
BATCH, NUM_STEPS, VOCAB = 32, 35, 28


def profiled_run(steps: int, graphs: bool, workdir: str) -> tuple[Counter, Counter]:
    """Waits and launches by name, and the flagged synchronizing operations by the Python line
    that asked for them (file:line), over one epoch of ``steps`` steps."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.config import ModelConfig, TrainConfig
    from pipeline.training.train import train

    ids = np.random.default_rng(0).integers(0, VOCAB, steps * BATCH * NUM_STEPS + NUM_STEPS + 2_000)
    train_ids, val_ids = ids[:-2_000], ids[-2_000:]
    model = ModelConfig(cell="gru", hidden_size=256)
    cfg = TrainConfig(batch_size=BATCH, num_steps=NUM_STEPS, epochs=1, optimizer="sgd", lr=1.0, clip_norm=1.0,
                      device="cuda", cuda_graphs=graphs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                train(train_ids, val_ids, VOCAB, model, cfg, f"{workdir}/run-{steps}")
                torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    calls = Counter(e.name for e in prof.events() if is_wait(e.name) or e.name.startswith(LAUNCHES))
    flagged = Counter(f"{short_path(w.filename)}:{w.lineno}" for w in caught
                      if "synchronizing CUDA operation" in str(w.message))
    return calls, flagged


def per_step(long: Counter, short: Counter, steps: int) -> dict[str, float]:
    """What the longer run counted beyond the shorter, per extra step; nonzero ones, most first."""
    counts = {k: round((long[k] - short[k]) / steps, 3) for k in long | short}
    return dict(sorted(((k, v) for k, v in counts.items() if v), key=lambda kv: -kv[1]))


def is_wait(name: str) -> bool:
    return name.startswith(WAITS) and "Async" not in name


def short_path(filename: str) -> str:
    """pipeline/... or torch/... rather than the whole path."""
    for root in ("/pipeline/", "/torch/"):
        if root in filename:
            return root[1:] + filename.split(root, 1)[1]
    return filename


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50, help="steps of the shorter run (the longer has twice as many)")
    p.add_argument("--cuda-graphs", action="store_true", help="train.cuda_graphs: true")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to count")
        print(json.dumps({"bench": "cuda_syncs", "cuda_graphs": args.cuda_graphs, "waits_per_step": None,
                          "launches_per_step": None}))
        return
    with tempfile.TemporaryDirectory() as workdir:
        profiled_run(20, args.cuda_graphs, workdir)  # CUDA, cuDNN and the allocator warm up outside the count
        short, short_flagged = profiled_run(args.steps, args.cuda_graphs, workdir)
        long, long_flagged = profiled_run(2 * args.steps, args.cuda_graphs, workdir)
    calls = per_step(long, short, args.steps)
    waits = {n: v for n, v in calls.items() if is_wait(n)}
    launches = sum(v for n, v in calls.items() if n.startswith(LAUNCHES))
    flagged = per_step(long_flagged, short_flagged, args.steps)
    print(f"d2l GRU, {'CUDA graph' if args.cuda_graphs else 'eager'} step, per step over {args.steps} steps:")
    print(f"  launches {launches:.1f}; host waits {sum(waits.values()):.3f}")
    for name, per in waits.items():
        print(f"  {name}: {per:.3f} a step")
    for where, per in flagged.items():
        print(f"  synchronizing operation at {where}: {per:.3f} a step")
    print(json.dumps({"bench": "cuda_syncs", "cuda_graphs": args.cuda_graphs, "steps": args.steps,
                      "waits_per_step": round(sum(waits.values()), 3), "waits": waits, "flagged": flagged,
                      "launches_per_step": round(launches, 1), "device": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
