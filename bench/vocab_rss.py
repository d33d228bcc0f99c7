"""Peak RSS of ``prepare`` on a word-level corpus with very many distinct types.

    python bench/vocab_rss.py [--tokens 8000000] [--rare-share 0.4] [--rare-types 5000000]

A seeded synthetic corpus: ``1 - rare_share`` of its words from a Zipfian 50k-word
vocabulary, the rest drawn uniformly from ``rare_types`` words (so most of those appear
once or twice: over a million distinct types at the defaults). ``prepare_dataset`` runs
in a fresh process (word level, no normalization, ``vocab.max_size`` 100k); its peak RSS is
that process's ru_maxrss. Prints the figures, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scale import words_of  # bench/ is this script's directory: the same words as bench/scale.py

REPO = Path(__file__).resolve().parents[1]


def synthetic_words(path: Path, tokens: int, rare_share: float, rare_types: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="ascii") as f:
        left = tokens
        while left:
            n = min(left, 1_000_000)
            common = np.minimum(rng.zipf(1.1, n), 50_000) - 1
            rare = 50_000 + rng.integers(0, rare_types, n)
            ids = np.where(rng.random(n) < rare_share, rare, common)
            words = words_of(ids.tolist())
            f.write("\n".join(" ".join(words[i: i + 20]) for i in range(0, n, 20)) + "\n")
            left -= n


CHILD = """
import json, logging, resource, sys, time
logging.basicConfig(level=logging.INFO)
from pipeline.config import DataConfig, SourceConfig, TokenizerConfig, VocabConfig
from pipeline.data.prepare import prepare_dataset
t0 = time.perf_counter()
ds = prepare_dataset(DataConfig(sources=(SourceConfig(url=sys.argv[1]),),
                                tokenizer=TokenizerConfig(level="word", normalizer="none"),
                                vocab=VocabConfig(max_size=100_000)), sys.argv[2])
print(json.dumps({"prepare_s": time.perf_counter() - t0, "num_tokens": ds.num_tokens,
                  "vocab_size": ds.vocab_size,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8_000_000)
    p.add_argument("--rare-share", type=float, default=0.4)
    p.add_argument("--rare-types", type=int, default=5_000_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="vocab-rss-") as tmp:
        text = Path(tmp) / "words.txt"
        synthetic_words(text, args.tokens, args.rare_share, args.rare_types)
        size_mb = text.stat().st_size / 2**20
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, str(text), str(Path(tmp) / "store")], cwd=REPO,
                             capture_output=True, text=True, check=True)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        distinct = next((line for line in out.stderr.splitlines() if "distinct" in line), "")
    print(f"corpus {size_mb:.1f} MB, {figures['num_tokens']:,} tokens; {distinct.split(': ', 1)[-1]}")
    print(f"prepare {figures['prepare_s']:.1f} s, peak RSS {figures['peak_rss_mb']:.0f} MB "
          f"(wall {time.perf_counter() - t0:.1f} s)")
    print(json.dumps({"bench": "vocab_rss", "corpus_mb": round(size_mb, 1), **figures}))


if __name__ == "__main__":
    main()
