"""Before and after: the three throughput benchmarks on another revision and on this tree, interleaved.

    python bench/compare_revisions.py --base bff7b8e                    # data, trainer and flow
    python bench/compare_revisions.py --base HEAD~3 --benchmarks trainer --rounds 3

The base revision is exported with ``git archive`` into a temporary directory. Each benchmark
runs as ``python <tree>/bench/<script>`` with ``PYTHONPATH=<tree>``: both trees use this
virtual environment's packages and their own code. Rounds alternate the order (base then
this tree, then the other way round) so a drift in the machine's speed favours neither, and
the best figure of each side is kept. Benchmarks:

* ``data``: ``bench/data_throughput.py`` (``prepare_dataset`` MB/s, char and word level);
* ``trainer``: ``bench/train_throughput.py``'s trainer section (d2l's settings, rnn/gru/lstm
  x 1/2 layers x 1/2 ranks): the trainer's tokens/s, and its ratio to the plain PyTorch loop
  measured in the same process;
* ``flow``: ``bench/flow_overhead.py`` with a fixed number of epochs on both sides: the
  orchestration overhead (flow minus direct seconds) and the fully cached re-run.

Prints a table (figure, base, this tree, this tree / base), then one JSON line with the
figures and ``speed_ratio_min``: the smallest this-tree-over-base ratio of the figures where
higher is better (MB/s, tokens/s), and ``trainer_ratio_delta_min``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def export_revision(rev: str, into: Path) -> Path:
    """The tree of ``rev`` (``git archive``), unpacked into ``into``."""
    archive = into / "base.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), rev], check=True)
    tree = into / "base"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    archive.unlink()
    return tree


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def run_bench(tree: Path, script: str, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(tree / "bench" / script), *args], env=env, cwd=tree,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{script} failed in {tree} (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return last_json(proc.stdout)


# Each benchmark: (script, its arguments for a tree, figures from its JSON line). A figure is
# (name, value, higher_is_better).
Figures = list[tuple[str, float, bool]]


def data_figures(out: dict) -> Figures:
    return [(f"data {level} MB/s", out[f"{level}_mb_s"], True) for level in ("char", "word")]


def trainer_args(tree: Path, steps: int) -> list[str]:
    args = ["--steps", str(steps), "--repeats", "2", "--device", "cpu"]
    if "--sections" in (tree / "bench" / "train_throughput.py").read_text():  # newer script: one section
        args += ["--sections", "trainer"]
    return args


def trainer_figures(out: dict) -> Figures:
    figures: Figures = []
    for r in out["rows"]:
        # older rows: cell/layers/plain_tokens_per_s; newer: model "d2l-<cell>-<layers>"/baseline_tokens_per_s
        name = r.get("model") or f"d2l-{r['cell']}-{r['layers']}"
        label = f"trainer {name} x{r['ranks']}"
        figures += [(f"{label} tokens/s", r["tokens_per_s"], True), (f"{label} ratio to plain", r["ratio"], True)]
    return figures


def flow_figures(out: dict) -> Figures:
    return [("flow overhead s", out["overhead_s"], False), ("flow cached re-run s", out["cached_rerun_s"], False)]


def benchmarks(args) -> dict[str, tuple[str, Callable[[Path], list[str]], Callable[[dict], Figures]]]:
    return {
        "data": ("data_throughput.py", lambda tree: ["--sizes", *map(str, args.data_sizes)], data_figures),
        "trainer": ("train_throughput.py", lambda tree: trainer_args(tree, args.steps), trainer_figures),
        "flow": ("flow_overhead.py", lambda tree: ["--epochs", str(args.flow_epochs)], flow_figures),
    }


def keep_best(best: dict[str, float], figures: Figures) -> None:
    for name, value, higher in figures:
        if name not in best:
            best[name] = value
        else:
            best[name] = max(best[name], value) if higher else min(best[name], value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the revision to compare with (any git revision)")
    p.add_argument("--benchmarks", default="data,trainer,flow")
    p.add_argument("--rounds", type=int, default=2, help="each side this many times, order alternating")
    p.add_argument("--flow-rounds", type=int, default=1, help="rounds for the (slow) flow benchmark")
    p.add_argument("--steps", type=int, default=50, help="trainer: steps per timed epoch")
    p.add_argument("--data-sizes", type=int, nargs=2, default=[50, 100], metavar=("SMALL_MB", "LARGE_MB"))
    p.add_argument("--flow-epochs", type=int, default=4, help="flow: epochs of training on both sides")
    args = p.parse_args()
    table = benchmarks(args)
    chosen = args.benchmarks.split(",")
    if set(chosen) - set(table):
        sys.exit(f"unknown --benchmarks {sorted(set(chosen) - set(table))}; choose from {sorted(table)}")

    best: dict[str, dict[str, float]] = {"base": {}, "head": {}}
    higher: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="rnnlm-compare-") as tmp:
        trees = {"base": export_revision(args.base, Path(tmp)), "head": REPO}
        for name in chosen:
            script, script_args, figures_of = table[name]
            for round_ in range(args.flow_rounds if name == "flow" else args.rounds):
                for side in (("base", "head") if round_ % 2 == 0 else ("head", "base")):
                    figures = figures_of(run_bench(trees[side], script, script_args(trees[side])))
                    keep_best(best[side], figures)
                    higher.update({f: h for f, _, h in figures})
                    print(f"{name} round {round_ + 1} {side}: "
                          + ", ".join(f"{f} {v:,.3g}" for f, v, _ in figures[:4]), file=sys.stderr, flush=True)

    rows = [{"figure": f, "base": best["base"][f], "head": best["head"][f],
             "head_over_base": round(best["head"][f] / best["base"][f], 3) if best["base"][f] else None}
            for f in best["head"] if f in best["base"]]
    print(f"\n{'figure':<40} {'base':>12} {'this tree':>12} {'ratio':>7}")
    for r in rows:
        print(f"{r['figure']:<40} {r['base']:>12,.3f} {r['head']:>12,.3f} {r['head_over_base'] or 0:>7.3f}")
    speed = [r["head_over_base"] for r in rows if higher[r["figure"]] and "ratio to plain" not in r["figure"]]
    deltas = [r["head"] - r["base"] for r in rows if "ratio to plain" in r["figure"]]
    print(json.dumps({"base": args.base, "rows": rows, "speed_ratio_min": min(speed) if speed else None,
                      "trainer_ratio_delta_min": round(min(deltas), 3) if deltas else None,
                      "cpu_count": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
