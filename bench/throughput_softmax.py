"""Adaptive vs full softmax: training tokens/s and peak memory at vocabularies of 10k, 50k and 250k
(or any others: their cutoffs are ``softmax: auto``'s, pipeline.model.models.default_cutoffs).

A 1-layer LSTM (embedding and hidden 256), batch 20 x 35, SGD with clipping, on token ids
drawn from a Zipf distribution (p(rank r) ~ 1/r: what word frequencies look like, and what
decides how often the adaptive head's tail clusters run). Each (vocabulary, head) pair runs
in a fresh process so that its peak memory is its own: peak RSS on CPU, the CUDA caching
allocator's peak on a GPU. Matmuls at the trainer's default precision (TF32 on a GPU), as
training runs them. ``speedup`` is adaptive over full tokens/s; target at 250k >= 2.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VOCABS = {10_000: (1_000, 5_000), 50_000: (4_000, 20_000), 250_000: (20_000, 40_000, 200_000)}
HIDDEN, BATCH, NUM_STEPS = 256, 20, 35
# (warm-up, timed) steps. A GPU step of this model takes milliseconds: time enough of them that
# launch costs and the adaptive head's per-batch cluster shapes average out.
STEPS = {"cpu": (2, 5), "cuda": (20, 200)}


def zipf_ids(vocab: int, n: int, seed: int = 0):
    import numpy as np

    p = 1.0 / np.arange(1, vocab + 1)
    return np.random.default_rng(seed).choice(vocab, size=n, p=p / p.sum()).astype(np.int64)


def measure(vocab: int, softmax: str, device: str) -> dict:
    """Runs in its own process: tokens/s over TIMED steps and the peak memory."""
    import torch

    from pipeline.config import ModelConfig, TrainConfig
    from pipeline.model.models import build_model, default_cutoffs
    from pipeline.training.optim import clip_grad_norm_
    from pipeline.training.precision import set_matmul_precision

    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    set_matmul_precision(TrainConfig().tf32, dev)  # the matmuls as training runs them (TF32 on a GPU)
    torch.manual_seed(0)
    # Other vocabularies get the cutoffs softmax: auto would give them.
    extra = {"adaptive_cutoffs": VOCABS.get(vocab) or default_cutoffs(vocab)} if softmax == "adaptive" else {}
    model = build_model(ModelConfig(cell="lstm", hidden_size=HIDDEN, embed_size=HIDDEN, init="default",
                                    softmax=softmax, **extra), vocab).to(dev)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    WARMUP, TIMED = STEPS[dev.type]
    ids = torch.from_numpy(zipf_ids(vocab, BATCH * NUM_STEPS * (WARMUP + TIMED) + 1)).to(dev)
    X = ids[:-1].reshape(BATCH, -1)
    Y = ids[1:].reshape(BATCH, -1)
    state, t0 = None, 0.0
    for step in range(WARMUP + TIMED):
        if step == WARMUP:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        cols = slice(step * NUM_STEPS, (step + 1) * NUM_STEPS)
        state = None if state is None else tuple(s.detach() for s in state)
        loss, state = model(X[:, cols], state, targets=Y[:, cols])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_(params, 1.0)
        opt.step()
    loss.item()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"vocab": vocab, "softmax": softmax, "tokens_per_s": round(BATCH * NUM_STEPS * TIMED / seconds),
            "peak_mb": round(peak / 2**20), "memory": "cuda allocator peak" if dev.type == "cuda" else "peak RSS"}


def softmax_rows(repo: Path, device: str = "auto", vocabs=tuple(VOCABS)) -> list[dict]:
    from pipeline.training.launch import trainer_env

    env = trainer_env({"PYTHONPATH": str(repo)})  # OpenMP's waiting as the launcher sets it
    rows = []
    for vocab in vocabs:
        pair = {}
        for softmax in ("full", "adaptive"):
            proc = subprocess.run([sys.executable, __file__, str(vocab), softmax, device], env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"softmax row {vocab}/{softmax} failed:\n{proc.stderr[-3000:]}")
            pair[softmax] = json.loads(proc.stdout.strip().splitlines()[-1])
        full, adaptive = pair["full"], pair["adaptive"]
        rows.append({"vocab": vocab, "full_tokens_per_s": full["tokens_per_s"],
                     "adaptive_tokens_per_s": adaptive["tokens_per_s"],
                     "speedup": round(adaptive["tokens_per_s"] / full["tokens_per_s"], 2),
                     "full_peak_mb": full["peak_mb"], "adaptive_peak_mb": adaptive["peak_mb"],
                     "memory": full["memory"]})
    return rows


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]), sys.argv[2], sys.argv[3])))
