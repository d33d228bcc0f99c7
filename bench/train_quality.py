"""Quality of a preset within a time budget, and what each of its regularisation techniques adds.

Trains the preset (default ``timemachine-char``, the default of ``rnnlm run``) for at most
``--minutes`` of training and reports the best validation perplexity, the epoch that reached
it and the training seconds at that epoch, and the same for the best epoch that ended within
the budget (the run ends after the epoch that passes it; the target counts the epochs within
it). Then, unless ``--no-ablation``, the ablation: one
run per technique the preset uses, with that technique turned off, and one with all of them
off, each under the same budget. Presets whose data are fractions of one text (the Time
Machine) validate on its last 5% (train 95%, val 5%, no test split), as the figure in
docs/benchmarks.md does; presets with named splits use their own validation file.

    python bench/train_quality.py                                  # timemachine-char, 3 min, ablation
    python bench/train_quality.py --minutes 3 --target 4.30 --no-ablation
    python bench/train_quality.py --preset ptb-word-awd --minutes 600 --no-ablation   # a GPU recipe
    python bench/train_quality.py --set train.epochs=4             # a quick look (any config override)

Prints one line per epoch of the full run, the ablation table, then one JSON line.
Targets on a quiet 2-core CPU machine: ``timemachine-char`` <= 4.30 within 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

from pipeline.config import RunConfig
from pipeline.config_sources import load_run_config
from pipeline.training.metrics import read_epochs
from pipeline.data.prepare import prepare_dataset
from pipeline.training.train import train

# Each technique: (name, is it on in this config, the overrides that turn it off).
TECHNIQUES = [
    ("locked dropout", lambda c: bool(c.model.dropout_input or c.model.dropout_between or c.model.dropout_output),
     {"model.dropout_input": 0.0, "model.dropout_between": 0.0, "model.dropout_output": 0.0}),
    ("dropout (element-wise)", lambda c: bool(c.model.dropout), {"model.dropout": 0.0}),
    ("embedding dropout", lambda c: bool(c.model.dropout_embedding), {"model.dropout_embedding": 0.0}),
    ("weight drop", lambda c: bool(c.model.weight_drop), {"model.weight_drop": 0.0}),
    ("AR/TAR", lambda c: bool(c.train.ar or c.train.tar), {"train.ar": 0.0, "train.tar": 0.0}),
    ("variable BPTT", lambda c: c.train.variable_bptt, {"train.variable_bptt": False}),
    ("NT-ASGD", lambda c: c.train.optimizer == "nt_asgd", {"train.optimizer": "sgd"}),
    ("early stopping", lambda c: c.train.patience is not None, {"train.patience": None}),
]


def base_overrides(preset: str, minutes: float, extra: list[str]) -> list[str]:
    cfg = load_run_config(preset, extra)
    overrides = [f"train.max_minutes={minutes}", *extra]
    if not any(getattr(s, "split", None) for s in cfg.data.sources):  # fractions of one text
        overrides += ["data.splits.train=0.95", "data.splits.val=0.05", "data.splits.test=0"]
    return overrides


def run_once(cfg: RunConfig, dataset, run_dir: str) -> dict[str, Any]:
    """Train; the best validation epoch, its perplexity and training seconds, and the run's length."""
    started = time.perf_counter()
    result = train(dataset.split("train"), dataset.split("val"), dataset.vocab_size, cfg.model, cfg.train, run_dir)
    wall = time.perf_counter() - started
    epochs = read_epochs(run_dir)
    scored = [e for e in epochs if e["val_ppl"] is not None]
    best = min(scored, key=lambda e: e["val_ppl"])
    in_budget = best_within(scored, (cfg.train.max_minutes or math.inf) * 60)
    return {"best_val_ppl": round(best["val_ppl"], 4), "best_epoch": best["epoch"],
            "best_at_s": round(best["elapsed_s"], 1),
            "best_in_budget_val_ppl": round(in_budget["val_ppl"], 4) if in_budget else None,
            "best_in_budget_epoch": in_budget["epoch"] if in_budget else None,
            "best_in_budget_at_s": round(in_budget["elapsed_s"], 1) if in_budget else None,
            "epochs": len(epochs),
            "stopped_early": len(epochs) < cfg.train.epochs and cfg.train.patience is not None
            and epochs[-1]["epoch"] - best["epoch"] >= cfg.train.patience,
            "tokens_per_s": round(result["tokens_per_s"] or 0), "wall_s": round(wall, 1), "metrics": epochs}


def best_within(epochs: list[dict], budget_s: float) -> dict | None:
    """The epoch with the lowest validation perplexity among those that ended within ``budget_s``
    seconds of training (max_minutes ends a run after the epoch that passes it), or None."""
    return min((e for e in epochs if e["val_ppl"] is not None and e["elapsed_s"] <= budget_s),
               key=lambda e: e["val_ppl"], default=None)


def ablation_variants(cfg: RunConfig) -> list[tuple[str, dict[str, Any]]]:
    """("without X", overrides) for every technique ``cfg`` uses, then all of them off."""
    active = [(name, off) for name, is_on, off in TECHNIQUES if is_on(cfg)]
    variants = [(f"without {name}", off) for name, off in active]
    if len(active) > 1:
        variants.append(("none of them", {k: v for _, off in active for k, v in off.items()}))
    return variants


def print_epochs(epochs: list[dict]) -> None:
    print(f"{'epoch':>5} {'train ppl':>9} {'val ppl':>8} {'tokens/s':>9} {'lr':>8} {'elapsed s':>9}")
    for e in epochs:
        print(f"{e['epoch']:>5} {e['train_ppl']:>9.3f} {e['val_ppl']:>8.3f} {e['tokens_per_s']:>9,.0f} "
              f"{e['lr']:>8.2g} {e['elapsed_s']:>9.1f}")


def print_table(rows: list[dict]) -> None:
    print(f"\n{'variant':<32} {'best val ppl':>12} {'vs full':>8} {'epoch':>5} {'at s':>6} {'epochs':>6} "
          f"{'within budget':>13}")
    full = rows[0]["best_val_ppl"]
    for r in rows:
        within = r["best_in_budget_val_ppl"]
        print(f"{r['variant']:<32} {r['best_val_ppl']:>12.3f} {r['best_val_ppl'] - full:>+8.3f} "
              f"{r['best_epoch']:>5} {r['best_at_s']:>6.0f} {r['epochs']:>6} "
              f"{within if within is not None else float('nan'):>13.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="timemachine-char")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget of every run")
    p.add_argument("--target", type=float, default=4.30, help="best validation perplexity to reach")
    p.add_argument("--no-ablation", action="store_true", help="only the preset itself")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = p.parse_args()

    overrides = base_overrides(args.preset, args.minutes, args.set)
    cfg = load_run_config(args.preset, overrides)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        dataset = prepare_dataset(cfg.data, root)
        full = run_once(cfg, dataset, os.path.join(root, "full"))
        print_epochs(full.pop("metrics"))
        rows.append({"variant": "full preset", **full})
        for i, (name, off) in enumerate([] if args.no_ablation else ablation_variants(cfg)):
            variant = load_run_config(args.preset, [*overrides, *(f"{k}={json.dumps(v)}" for k, v in off.items())])
            row = run_once(variant, dataset, os.path.join(root, f"ablation-{i}"))
            row.pop("metrics")
            rows.append({"variant": name, **row})
            print(f"{name}: best val ppl {row['best_val_ppl']:.3f} at epoch {row['best_epoch']}", flush=True)
    print_table(rows)
    summary = {"preset": args.preset, "minutes": args.minutes, "target": args.target, **rows[0],
               "target_met": (rows[0]["best_in_budget_val_ppl"] or math.inf) <= args.target,
               "ablation": rows[1:], "overrides": args.set, "cpu_count": os.cpu_count(),
               "load_average": round(os.getloadavg()[0], 2)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
