"""Wall time of a 4-trial sweep packed 2 per device against the same 4 trials one after another.

    .venv/bin/python bench/sweep_packing.py [--epochs 1] [--max-tokens 20000] [--hidden 64] [--device cpu]

Each way runs ``rnnlm run --sweep`` (the retrain flow, registration off) in a fresh storage root,
so nothing is cached between them; the data stage is in both. On CPU the packed trials split the
usable cores (``RNNLM_NUM_THREADS``), on a GPU they share it. Prints both wall times, the speed-up
and the best trial with its validation perplexity each way (they must be equal), then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRID = {"train.lr": [0.004, 0.002], "model.dropout_output": [0.0, 0.1]}


def sweep_once(root: str, trials_per_device: int, overrides: list[str]) -> tuple[float, dict]:
    import yaml

    from flows.main import run_main

    path = Path(root) / "sweep.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"grid": GRID, "trials_per_device": trials_per_device}))
    started = time.perf_counter()
    summary = run_main("timemachine-char", root, overrides, options={"register_model": False},
                       print_summary=False, sweep=str(path))
    wall = time.perf_counter() - started
    best = next(t for t in summary["sweep"]["trials"] if t["status"] == "best")
    return wall, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=20000, help="data.splits.max_tokens: the training slice")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()
    overrides = [f"train.epochs={args.epochs}", "train.max_minutes=null", f"data.splits.max_tokens={args.max_tokens}",
                 f"model.hidden_size={args.hidden}", "model.embed_size=16", f"train.device={args.device}"]
    os.environ.pop("RNNLM_STORAGE", None)
    with tempfile.TemporaryDirectory() as tmp:
        packed_s, packed = sweep_once(os.path.join(tmp, "packed"), 2, overrides)
        sequential_s, sequential = sweep_once(os.path.join(tmp, "sequential"), 1, overrides)
    same = (packed["id"], packed["val_ppl"]) == (sequential["id"], sequential["val_ppl"])
    print(f"4 trials, 2 per device: {packed_s:.1f} s (best {packed['id']}, val ppl {packed['val_ppl']:.4f})")
    print(f"4 trials, one at a time: {sequential_s:.1f} s (best {sequential['id']}, val ppl {sequential['val_ppl']:.4f})")
    print(f"speed-up {sequential_s / packed_s:.2f}x; best trial and perplexity equal: {same}")
    print(json.dumps({"packed_s": round(packed_s, 2), "sequential_s": round(sequential_s, 2),
                      "speedup": round(sequential_s / packed_s, 3), "best_trial": packed["id"],
                      "best_val_ppl_packed": packed["val_ppl"], "best_val_ppl_sequential": sequential["val_ppl"],
                      "best_equal": same, "cpus": len(os.sched_getaffinity(0)), "settings": overrides}))


if __name__ == "__main__":
    main()
