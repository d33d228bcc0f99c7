"""Per-rank peak RSS of a 2-rank trainer, small corpus vs large: the split is memory-mapped and shared.

    python bench/split_rss.py [--small-mb 1] [--large-mb 200] [--steps 200] [--nproc 2]

For each size: a seeded synthetic char-level corpus (letters and spaces) is prepared, then
``--nproc`` CPU ranks train a tiny GRU for ``--steps`` steps (``train.max_steps``) through the
launcher; each rank's peak RSS is its VmHWM, polled from /proc while it runs. The validation
and test splits are a fixed ~``--val-tokens`` each whatever the corpus, so the figure isolates
the training split (validation holds its split, as int64, in memory). Prints a table,
then ONE JSON line. Target: the large corpus's per-rank peak within 64 MB of the small one's.
``rank_peak_rss`` and ``synthetic_chars`` are meant for reuse by other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_MB = 64.0


def synthetic_chars(path: Path, megabytes: float, seed: int = 0) -> None:
    """``megabytes`` of seeded lowercase letters and spaces (words of 1-10 letters), in 8 MB blocks."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", dtype=np.uint8)
    left = int(megabytes * 2**20)
    with open(path, "wb") as f:
        while left:
            n = min(left, 8 * 2**20)
            block = alphabet[rng.integers(0, 26, n)]
            block[rng.random(n) < 0.15] = ord(" ")
            f.write(block.tobytes())
            left -= n


def rank_peak_rss(root_pid: int, stop: threading.Event, peaks: dict[int, float], poll_s: float = 0.05) -> None:
    """Until ``stop``: the VmHWM (peak RSS, MB) of every descendant of ``root_pid`` with a RANK, by rank."""
    while not stop.is_set():
        try:
            children = psutil.Process(root_pid).children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            try:
                rank = child.environ().get("RANK")
                if rank is None:
                    continue
                with open(f"/proc/{child.pid}/status") as f:
                    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
                peaks[int(rank)] = max(peaks.get(int(rank), 0.0), hwm / 1024)
            except (psutil.Error, OSError, StopIteration):
                continue
        time.sleep(poll_s)


def measure(workdir: Path, megabytes: float, steps: int, nproc: int, val_tokens: int = 50_000) -> dict:
    from pipeline.config import (DataConfig, ModelConfig, RunConfig, SourceConfig, SplitConfig, TokenizerConfig,
                                 TrainConfig)
    from pipeline.data.prepare import prepare_dataset
    from pipeline.training.launch import launch_training

    text = workdir / f"corpus-{megabytes:g}mb.txt"
    synthetic_chars(text, megabytes)
    held_out = min(0.05, val_tokens / (megabytes * 2**20))
    t0 = time.perf_counter()
    ds = prepare_dataset(DataConfig(sources=(SourceConfig(url=str(text)),),
                                    tokenizer=TokenizerConfig(level="char", normalizer="none", newlines="keep"),
                                    splits=SplitConfig(train=1 - 2 * held_out, val=held_out, test=held_out)),
                         str(workdir / "store"))
    prepare_s = time.perf_counter() - t0
    cfg = RunConfig(model=ModelConfig(cell="gru", hidden_size=64, embed_size=16),
                    train=TrainConfig(epochs=1, max_steps=steps, batch_size=32, device="cpu"))
    peaks: dict[int, float] = {}
    stop = threading.Event()
    watcher: list[threading.Thread] = []

    def on_line(line: str) -> None:  # the launcher's child is up once it talks: watch its ranks
        if not watcher:
            pid = next((p.pid for p in psutil.Process().children() if "pipeline.training" in " ".join(p.cmdline())),
                       None)
            if pid is not None:
                watcher.append(threading.Thread(target=rank_peak_rss, args=(pid, stop, peaks), daemon=True))
                watcher[0].start()

    t0 = time.perf_counter()
    launched = launch_training(str(workdir / f"run-{megabytes:g}"), ds.uri, cfg, nproc=nproc, on_line=on_line,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "RNNLM_NUM_THREADS": "1"})
    train_s = time.perf_counter() - t0
    stop.set()
    for t in watcher:
        t.join()
    split_mb = ds.manifest["splits"]["train"]["num_tokens"] * np.dtype(ds.manifest["dtype"]).itemsize / 2**20
    return {"corpus_mb": megabytes, "train_split_mb": round(split_mb, 1), "prepare_s": round(prepare_s, 2),
            "train_s": round(train_s, 2), "steps": launched.result["steps"],
            "rank_peak_rss_mb": {r: round(v, 1) for r, v in sorted(peaks.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small-mb", type=float, default=1.0)
    p.add_argument("--large-mb", type=float, default=200.0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--val-tokens", type=int, default=50_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="split-rss-") as tmp:
        os.environ.setdefault("RNNLM_SPLIT_CACHE", str(Path(tmp) / "split-cache"))
        rows = [measure(Path(tmp), mb, args.steps, args.nproc, args.val_tokens) for mb in (args.small_mb, args.large_mb)]
    print(f"{'corpus MB':>10} {'split MB':>9} {'prepare s':>10} {'train s':>8}  per-rank peak RSS MB")
    for r in rows:
        print(f"{r['corpus_mb']:>10g} {r['train_split_mb']:>9} {r['prepare_s']:>10} {r['train_s']:>8}  "
              f"{r['rank_peak_rss_mb']}")
    small, large = (max(r["rank_peak_rss_mb"].values()) for r in rows)
    growth = large - small
    print(f"largest per-rank peak grows by {growth:.1f} MB (target <= {TARGET_MB:g} MB)")
    print(json.dumps({"bench": "split_rss", "rows": rows, "rank_peak_growth_mb": round(growth, 1),
                      "target_mb": TARGET_MB, "ok": growth <= TARGET_MB}))


if __name__ == "__main__":
    main()
