"""How each cost grows with the corpus: prepare, trainer start-up, per-rank memory, speed, validation.

    python bench/scale.py [--sizes 10M,100M] [--steps 300] [--eval-every 100] [--workdir DIR]
    python bench/scale.py --sizes 10M,100M,1B     # the 1B row: about 7 GB of free disk under --workdir

For each size, a seeded synthetic word corpus is streamed to disk a million words at a time:
words drawn from a Zipfian (s = 1) distribution over a finite vocabulary, 10k types at 10M
words, 100k at 100M, 800k at 1B (other sizes: one type per thousand words, at least 1,000, at
most 800k), twenty words a line. Then:

* **prepare**: ``prepare_dataset`` (word level, ``vocab.max_size`` 10k, validation and test
  splits a fixed ``--val-tokens`` each, at most 5% of the corpus) in a fresh process: seconds
  and peak RSS (ru_maxrss). It counts every type of the corpus, so its cost sees the
  vocabulary grow.
* **train**: 2 CPU ranks (torchrun, through ``launch_training``) train the same small GRU on
  every size (the 10k vocabulary keeps the model and so the step fixed) for ``--steps`` steps
  (``train.max_steps``), validating every ``--eval-every`` (``train.eval_every_steps``).
  Start-up is launch to the first step (the first progress line's arrival minus its training
  time); the first launch writes the host's split cache (docs/scale.md), so a second, short
  launch on the same dataset gives the warm start-up. Per-rank peak RSS is each rank's VmHWM.
  Steady tokens/s is the median over the evaluations after the first (the first holds the
  warm-up); seconds per validation is the time between two evaluations' lines less their
  stretch's training (so it holds the validation and the checkpoint before the stretch).

Prints a table, each cost's growth exponent between consecutive sizes (the log-log slope),
the targets and whether they are met, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from split_rss import rank_peak_rss  # noqa: E402  (one per-rank VmHWM poller for both benchmarks)

TYPES = {10_000_000: 10_000, 100_000_000: 100_000, 1_000_000_000: 800_000}
MODEL_VOCAB = 10_000  # vocab.max_size: the same model, so the same step, at every size
WORDS_PER_LINE = 20
CHUNK_WORDS = 1_000_000
WARM_STEPS = 10  # the warm launch only has to reach its first progress line
BATCH_SIZE, NUM_STEPS = 32, 35
# Targets (issue 24). Exponents are log-log slopes between consecutive sizes.
TARGETS = {"prepare_s": ("<=", 1.1), "rank_peak_rss_mb": ("<=", 0.05), "tokens_per_s": (">=", -0.05)}
STARTUP_TARGET_S, STARTUP_TARGET_AT = 10.0, 1_000_000_000


def parse_size(text: str) -> int:
    """'100k' -> 100_000, '10M' -> 10_000_000, '1B' -> 1_000_000_000."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def size_label(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return str(n)


def types_for(tokens: int) -> int:
    return TYPES.get(tokens, min(800_000, max(1_000, tokens // 1_000)))


def words_of(ids) -> list[str]:
    """Distinct ids -> distinct lowercase words (the id in base 26)."""
    names = []
    for v in ids:
        s = []
        while True:
            v, r = divmod(v, 26)
            s.append(chr(97 + r))
            if v == 0:
                break
        names.append("".join(s))
    return names


def type_names(n: int) -> np.ndarray:
    """``n`` distinct lowercase words, as an object array to index with ids."""
    return np.array(words_of(range(n)), dtype=object)


def zipf_corpus(path: Path, tokens: int, types: int, seed: int = 0) -> None:
    """``tokens`` words, Zipfian over ``types`` types (rank r drawn with probability ~ 1/r), streamed to ``path``."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, types + 1))
    cdf /= cdf[-1]
    names = type_names(types)
    with open(path, "w", encoding="ascii") as f:
        left = tokens
        while left:
            n = min(left, CHUNK_WORDS)
            ids = np.minimum(np.searchsorted(cdf, rng.random(n)), types - 1)
            words = names[ids].tolist()
            f.write("\n".join(" ".join(words[i: i + WORDS_PER_LINE]) for i in range(0, n, WORDS_PER_LINE)) + "\n")
            left -= n


PREPARE = """
import json, resource, sys, time
from pipeline.config import DataConfig, SourceConfig, SplitConfig, TokenizerConfig, VocabConfig
from pipeline.data.prepare import prepare_dataset
held_out = float(sys.argv[3])
t0 = time.perf_counter()
ds = prepare_dataset(DataConfig(sources=(SourceConfig(url=sys.argv[1]),),
                                tokenizer=TokenizerConfig(level="word", normalizer="none"),
                                vocab=VocabConfig(max_size=int(sys.argv[4])),
                                splits=SplitConfig(train=1 - 2 * held_out, val=held_out, test=held_out)),
                     sys.argv[2])
print(json.dumps({"prepare_s": time.perf_counter() - t0, "uri": ds.uri, "num_tokens": ds.num_tokens,
                  "train_tokens": ds.manifest["splits"]["train"]["num_tokens"],
                  "val_tokens": ds.manifest["splits"]["val"]["num_tokens"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def prepare(text: Path, store: Path, held_out: float) -> dict:
    """prepare_dataset in a fresh process: its figures (seconds, peak RSS) and the dataset's URI."""
    out = subprocess.run([sys.executable, "-c", PREPARE, str(text), str(store), repr(held_out), str(MODEL_VOCAB)],
                         cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"prepare failed on {text}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def train(run_dir: Path, dataset_uri: str, steps: int, eval_every: int | None, nproc: int) -> dict:
    """One launch: start-up seconds, per-rank peak RSS, and its metrics lines."""
    from pipeline import progress
    from pipeline.config import ModelConfig, RunConfig, TrainConfig
    from pipeline.training.launch import launch_training

    cfg = RunConfig(model=ModelConfig(cell="gru", hidden_size=64, embed_size=32),
                    # max_steps ends the run, whatever the corpus: epochs only has to outlast it
                    train=TrainConfig(epochs=1000, max_steps=steps, eval_every_steps=eval_every, batch_size=BATCH_SIZE,
                                      num_steps=NUM_STEPS, sampling="sequential", device="cpu"))
    peaks: dict[int, float] = {}
    stop = threading.Event()
    watcher: list[threading.Thread] = []
    first_step: list[float] = []

    def on_line(line: str) -> None:
        if not watcher:  # the launcher's child is up once it talks: watch its ranks
            pid = next((p.pid for p in psutil.Process().children() if "pipeline.training" in " ".join(p.cmdline())),
                       None)
            if pid is not None:
                watcher.append(threading.Thread(target=rank_peak_rss, args=(pid, stop, peaks), daemon=True))
                watcher[0].start()

    def on_event(event: dict) -> None:
        if not first_step and event.get("event") == "progress" and event.get("stage") == "train":
            # training began elapsed_s before this line: that instant is the first step
            first_step.append(time.perf_counter() - event["elapsed_s"])

    env = {**os.environ, "OMP_NUM_THREADS": "1", "RNNLM_NUM_THREADS": "1", "RNNLM_PROGRESS_EVERY_S": "0.05"}
    t0 = time.perf_counter()
    with progress.listening(on_event):
        launched = launch_training(str(run_dir), dataset_uri, cfg, nproc=nproc, on_line=on_line, env=env)
    stop.set()
    for t in watcher:
        t.join()
    if not first_step:
        raise SystemExit(f"no progress line from the trainer in {run_dir}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"startup_s": first_step[0] - t0, "rank_peak_rss_mb": {r: v for r, v in sorted(peaks.items())},
            "evals": [m for m in metrics if m.get("event") == "eval"], "steps": launched.result["steps"]}


def steady_figures(evals: list[dict], tokens_per_step: int, eval_every: int) -> tuple[float, float]:
    """Median tokens/s and seconds per validation over the evaluations after the first."""
    later = list(zip(evals, evals[1:]))
    if not later:
        raise SystemExit("need at least two evaluations: raise --steps or lower --eval-every")
    tokens_per_s = statistics.median(b["tokens_per_s"] for _, b in later)
    val_s = statistics.median(b["elapsed_s"] - a["elapsed_s"] - tokens_per_step * eval_every / b["tokens_per_s"]
                              for a, b in later)
    return tokens_per_s, val_s


def measure(workdir: Path, tokens: int, args) -> dict:
    types = types_for(tokens)
    text = workdir / f"corpus-{size_label(tokens)}.txt"
    t0 = time.perf_counter()
    zipf_corpus(text, tokens, types)
    generate_s = time.perf_counter() - t0
    text_mb = text.stat().st_size / 2**20
    prep = prepare(text, workdir / "store", min(0.05, args.val_tokens / tokens))
    text.unlink()  # the corpus is in the store now: keep the disk for the next size
    run = train(workdir / f"run-{size_label(tokens)}", prep["uri"], args.steps, args.eval_every, args.nproc)
    warm = train(workdir / f"warm-{size_label(tokens)}", prep["uri"], WARM_STEPS, None,
                 args.nproc) if args.warm else None
    tokens_per_s, val_s = steady_figures(run["evals"], BATCH_SIZE * NUM_STEPS, args.eval_every)
    print(f"  {size_label(tokens)}: generated {text_mb:.0f} MB in {generate_s:.0f} s, prepared in "
          f"{prep['prepare_s']:.1f} s, trained {run['steps']} steps", flush=True)
    return {"tokens": tokens, "types": types, "text_mb": round(text_mb, 1), "train_tokens": prep["train_tokens"],
            "val_tokens": prep["val_tokens"], "prepare_s": round(prep["prepare_s"], 2),
            "prepare_mb_s": round(text_mb / prep["prepare_s"], 1), "prepare_rss_mb": round(prep["peak_rss_mb"], 1),
            "startup_s": round(run["startup_s"], 2),
            "startup_warm_s": round(warm["startup_s"], 2) if warm else None,
            "rank_peak_rss_mb": round(max(run["rank_peak_rss_mb"].values()), 1),
            "rank_peak_rss_by_rank_mb": {r: round(v, 1) for r, v in run["rank_peak_rss_mb"].items()},
            "tokens_per_s": round(tokens_per_s, 1), "val_s": round(val_s, 3)}


COSTS = ("prepare_s", "prepare_rss_mb", "startup_s", "startup_warm_s", "rank_peak_rss_mb", "tokens_per_s", "val_s")


def slope(a: dict, b: dict, cost: str) -> float | None:
    """The growth exponent of ``cost`` from row ``a`` to row ``b``: d log(cost) / d log(tokens)."""
    if not a.get(cost) or not b.get(cost) or a[cost] <= 0 or b[cost] <= 0:
        return None
    return math.log(b[cost] / a[cost]) / math.log(b["tokens"] / a["tokens"])


def verdicts(rows: list[dict], exponents: dict[str, list]) -> dict[str, bool | None]:
    """Each target: met (True), missed (False), or not measured (None)."""
    out: dict[str, bool | None] = {}
    for cost, (op, bound) in TARGETS.items():
        found = [e for e in exponents[cost] if e is not None]
        out[cost] = None if not found else all(e <= bound if op == "<=" else e >= bound for e in found)
    at = next((r for r in rows if r["tokens"] >= STARTUP_TARGET_AT), None)
    for cost in ("startup_s", "startup_warm_s"):  # cold (writes the split cache) and warm
        out[cost] = None if at is None or at.get(cost) is None else at[cost] <= STARTUP_TARGET_S
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10M,100M", help="corpus sizes in words, e.g. 100k,1M or 10M,100M,1B")
    p.add_argument("--steps", type=int, default=300, help="train.max_steps of each run")
    p.add_argument("--eval-every", type=int, default=100, help="train.eval_every_steps")
    p.add_argument("--val-tokens", type=int, default=50_000, help="the validation (and test) split's size")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--no-warm", dest="warm", action="store_false", help="skip the second (warm-cache) launch")
    p.add_argument("--workdir", default=None, help="where corpora, datasets and runs go (default: the temp dir)")
    args = p.parse_args()
    sizes = sorted(parse_size(s) for s in args.sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="scale-", dir=args.workdir) as tmp:
        os.environ["RNNLM_SPLIT_CACHE"] = str(Path(tmp) / "split-cache")  # a cold cache, removed afterwards
        rows = [measure(Path(tmp), n, args) for n in sizes]

    print(f"{'words':>6} {'types':>7} {'text MB':>8} {'prep s':>7} {'MB/s':>5} {'prep RSS':>9} {'start s':>8} "
          f"{'warm s':>7} {'rank RSS':>9} {'tokens/s':>9} {'val s':>6}")
    for r in rows:
        print(f"{size_label(r['tokens']):>6} {r['types']:>7} {r['text_mb']:>8} {r['prepare_s']:>7} "
              f"{r['prepare_mb_s']:>5} {r['prepare_rss_mb']:>9} {r['startup_s']:>8} {r['startup_warm_s'] or '-':>7} "
              f"{r['rank_peak_rss_mb']:>9} {r['tokens_per_s']:>9} {r['val_s']:>6}")
    exponents = {c: [slope(a, b, c) for a, b in zip(rows, rows[1:])] for c in COSTS}
    print("growth exponents (log-log slope between consecutive sizes):")
    for cost, values in exponents.items():
        print(f"  {cost:>17}: " + ", ".join("-" if v is None else f"{v:.3f}" for v in values))
    met = verdicts(rows, exponents)
    word = {True: "met", False: "MISSED", None: "not measured"}
    for cost, (op, bound) in TARGETS.items():
        print(f"target {cost} exponent {op} {bound}: {word[met[cost]]}")
    for cost, what in (("startup_s", "cold"), ("startup_warm_s", "warm")):
        print(f"target start-up ({what}) <= {STARTUP_TARGET_S:g} s at {size_label(STARTUP_TARGET_AT)} words: "
              f"{word[met[cost]]}")
    print(json.dumps({"bench": "scale", "sizes": [size_label(n) for n in sizes], "steps": args.steps,
                      "nproc": args.nproc, "rows": rows,
                      "exponents": {c: [None if v is None else round(v, 3) for v in vs] for c, vs in exponents.items()},
                      "targets": {c: f"{op} {b}" for c, (op, b) in TARGETS.items()}
                      | {c: f"<= {STARTUP_TARGET_S:g} at {size_label(STARTUP_TARGET_AT)}"
                         for c in ("startup_s", "startup_warm_s")},
                      "met": met}))


if __name__ == "__main__":
    main()
