"""Throughput and peak memory of ``prepare_dataset`` (fetch + count + encode + write).

    .venv/bin/python bench/data_throughput.py                 # 100 MB and 200 MB corpora
    .venv/bin/python bench/data_throughput.py --sizes 50 200  # other sizes, in MB (10^6 bytes)

The corpus is generated into a temp dir: the lines of the bundled Time Machine,
shuffled, with made-up words (Zipf-distributed over 300k forms) mixed into a third
of the lines so the word vocabulary grows the way a real corpus's does. Every
configuration runs in a fresh subprocess against an empty store, so its peak RSS
(``ru_maxrss`` of that process) is its own. Prints a table, then one JSON line.

Targets on a 2-core machine, one process: char >= 50 MB/s, word >= 20 MB/s,
peak RSS < 1 GB and not growing with the corpus size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 10**6
CONFIGS = {
    # the d2l preset: char level, d2l normalizer, newlines dropped
    "char": {"tokenizer": {"level": "char", "normalizer": "d2l"}},
    # word level with the d2l normalizer
    "word": {"tokenizer": {"level": "word", "normalizer": "d2l"}},
}


def generate_corpus(path: Path, size_bytes: int, seed: int = 0) -> int:
    """Write about ``size_bytes`` of text made from the bundled book; returns the exact size."""
    from importlib import resources

    import numpy as np

    text = (resources.files("pipeline") / "data" / "timemachine.txt").read_text(encoding="utf-8")
    lines = np.array([line for line in text.splitlines() if line.strip()], dtype=object)
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    forms = ["".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(300_000)]
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            block = lines[rng.permutation(len(lines))]
            ranks = np.minimum(rng.zipf(1.3, size=len(block)), len(forms)) - 1
            extra = rng.random(len(block)) < 1 / 3
            out = [f"{line} {forms[r]}" if e else line for line, r, e in zip(block, ranks, extra)]
            chunk = "\n".join(out) + "\n"
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    return os.path.getsize(path)


def child(level: str, corpus: str, root: str) -> None:
    """One measured run: prepare the dataset from scratch, report time and peak RSS."""
    from pipeline.config import DataConfig, SourceConfig, parse_config
    from pipeline.data.prepare import prepare_dataset

    rss_after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
    cfg = parse_config(DataConfig, {**CONFIGS[level], "sources": [{"url": corpus}]})
    assert cfg.sources == (SourceConfig(url=corpus),)
    start, cpu_start = time.perf_counter(), time.process_time()
    ds = prepare_dataset(cfg, root)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # user + system: what the run cost on a busy machine
    size = os.path.getsize(corpus)
    print(
        json.dumps(
            {
                "level": level,
                "corpus_mb": size / MB,
                "seconds": seconds,
                "mb_s": size / MB / seconds,
                "cpu_seconds": cpu_seconds,
                "mb_per_cpu_s": size / MB / cpu_seconds,
                "num_tokens": ds.num_tokens,
                "vocab_size": ds.vocab_size,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
                "rss_after_import_mb": rss_after_import,
            }
        )
    )


def measure(level: str, corpus: Path, workdir: Path) -> dict:
    root = workdir / f"store-{level}-{corpus.stem}"
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", level, str(corpus), str(root)],
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_before": load}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs=2, default=[100, 200], metavar=("SMALL_MB", "LARGE_MB"))
    p.add_argument("--levels", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--child", nargs=3, metavar=("LEVEL", "CORPUS", "ROOT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)

    results = []
    with tempfile.TemporaryDirectory(prefix="rnnlm-bench-") as tmp:
        workdir = Path(tmp)
        for label, mb in zip(("small", "large"), args.sizes):
            corpus = workdir / f"corpus-{mb}mb.txt"
            t = time.perf_counter()
            size = generate_corpus(corpus, mb * MB, seed=mb)
            print(f"generated {corpus.name}: {size / MB:.1f} MB in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            for level in args.levels:
                r = measure(level, corpus, workdir)
                r["size"] = label
                results.append(r)
                print(f"  {level:4s} {r['corpus_mb']:7.1f} MB  {r['mb_s']:6.1f} MB/s  peak RSS {r['peak_rss_mb']:6.0f} MB", file=sys.stderr, flush=True)
            corpus.unlink()

    load = os.getloadavg()[0]
    print(f"\nload average {load:.2f} on {os.cpu_count()} CPUs (MB = 10^6 bytes; MB/cpu-s = per second of this process's CPU time)")
    print(f"{'level':6s}{'size':>7s}{'corpus MB':>11s}{'seconds':>9s}{'MB/s':>8s}{'MB/cpu-s':>10s}{'tokens':>13s}{'vocab':>9s}{'peak RSS MB':>13s}")
    for r in results:
        print(
            f"{r['level']:6s}{r['size']:>7s}{r['corpus_mb']:11.1f}{r['seconds']:9.2f}{r['mb_s']:8.1f}{r['mb_per_cpu_s']:10.1f}"
            f"{r['num_tokens']:13,d}{r['vocab_size']:9,d}{r['peak_rss_mb']:13.0f}"
        )

    def pick(level, size, key):
        return next(r[key] for r in results if r["level"] == level and r["size"] == size)

    summary = {
        # throughput on the large corpus (the steady state); per-size numbers in "runs"
        **{f"{level}_mb_s": round(pick(level, "large", "mb_s"), 1) for level in args.levels},
        **{f"{level}_mb_per_cpu_s": round(pick(level, "large", "mb_per_cpu_s"), 1) for level in args.levels},
        "peak_rss_mb_small": round(max(r["peak_rss_mb"] for r in results if r["size"] == "small"), 1),
        "peak_rss_mb_large": round(max(r["peak_rss_mb"] for r in results if r["size"] == "large"), 1),
        "sizes_mb": args.sizes,
        "cpu_count": os.cpu_count(),
        "load_average": round(load, 2),
        "runs": [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in results],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
