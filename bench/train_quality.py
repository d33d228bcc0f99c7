"""Quality of the default model: validation perplexity within a time budget.

Trains the ``timemachine-char`` preset (d2l normalization, character level) on the bundled
Time Machine with the last 5% of the text as validation, for ``--minutes`` of training
(default 3, the preset's budget), and reports the best validation perplexity, when the
target was first reached, and tokens/s. Target on a 2-core CPU machine: <= 4.5 within 3 min.

    python bench/train_quality.py [--minutes 3] [--target 4.5] [--preset timemachine-char]

Prints one line per epoch, then one JSON line with ``best_val_ppl``, ``target_reached_s``, ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from pipeline.config import load_run_config
from pipeline.prepare import prepare_dataset
from pipeline.train import train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="timemachine-char")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--target", type=float, default=4.5)
    args = p.parse_args()

    cfg = load_run_config(args.preset, [f"train.max_minutes={args.minutes}", "data.splits.train=0.95",
                                        "data.splits.val=0.05", "data.splits.test=0"])
    with tempfile.TemporaryDirectory() as root:
        dataset = prepare_dataset(cfg.data, root)
        run_dir = os.path.join(root, "run")
        started = time.perf_counter()
        result = train(dataset.split("train"), dataset.split("val"), dataset.vocab_size, cfg.model, cfg.train, run_dir)
        wall = time.perf_counter() - started
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            epochs = [json.loads(line) for line in f if line.strip()]

    reached = next((e for e in epochs if e["val_ppl"] is not None and e["val_ppl"] <= args.target), None)
    print(f"{'epoch':>5} {'train ppl':>9} {'val ppl':>8} {'tokens/s':>9} {'lr':>8} {'elapsed s':>9}")
    for e in epochs:
        print(f"{e['epoch']:>5} {e['train_ppl']:>9.3f} {e['val_ppl']:>8.3f} {e['tokens_per_s']:>9,.0f} {e['lr']:>8.2g} {e['elapsed_s']:>9.1f}")
    summary = {
        "preset": args.preset, "minutes": args.minutes, "target": args.target,
        "best_val_ppl": min(e["val_ppl"] for e in epochs), "best_epoch": result.get("best_epoch"),
        "final_epoch_val_ppl": epochs[-1]["val_ppl"], "shipped_val_ppl": result["val_ppl"],
        "target_reached_epoch": reached["epoch"] if reached else None,
        "target_reached_s": round(reached["elapsed_s"], 1) if reached else None,
        "epochs": result["epochs"], "tokens_per_s": round(result["tokens_per_s"] or 0), "wall_s": round(wall, 1),
        "cpu_count": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2),
    }
    summary["target_met"] = summary["target_reached_s"] is not None and summary["target_reached_s"] <= args.minutes * 60
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
