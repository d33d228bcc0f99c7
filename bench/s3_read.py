"""What reading a prepared dataset from S3 costs, against reading it from local disk.

    .venv/bin/python bench/s3_read.py                # a 20 MB char-level corpus
    .venv/bin/python bench/s3_read.py --mb 100

Starts moto's S3 server on 127.0.0.1 (needs `make setup-servers`), prepares the same dataset
under a local root and under ``s3://<bucket>/rnnlm``, then times ``open_dataset(uri)`` plus
reading every split (every shard fetched in full and checked against the manifest's sha256;
nothing is cached on local disk). Against moto the S3 figure is the cost of the protocol and
hashing, not of a network: a real bucket adds its latency per shard and its bandwidth. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.servers starts (and stops) the S3 server

from bench.data_throughput import generate_corpus  # noqa: E402


def read_all(uri: str) -> tuple[float, int]:
    from pipeline.data.shards import SPLITS, open_dataset

    started = time.perf_counter()
    ds = open_dataset(uri)
    tokens = sum(len(ds.split(s)) for s in SPLITS)
    return time.perf_counter() - started, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="corpus size in MB (10^6 bytes)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from pipeline.config import DataConfig
    from pipeline.data.prepare import prepare_dataset
    from tests.servers import Processes, start_s3

    with tempfile.TemporaryDirectory() as tmp:
        procs = Processes(Path(tmp) / "logs")
        try:
            s3 = start_s3(procs)
            os.environ.update(s3.env)
            corpus = Path(tmp) / "corpus.txt"
            size = generate_corpus(corpus, int(args.mb * 10**6))
            cfg = DataConfig.model_validate({"sources": [{"url": str(corpus)}], "tokenizer": {"level": "char"}})
            rows = {}
            for where, root in (("local", str(Path(tmp) / "store")), ("s3", s3.new_bucket() + "/rnnlm")):
                uri = prepare_dataset(cfg, root).uri
                times = [read_all(uri) for _ in range(args.repeats)]
                best, tokens = min(times)
                rows[where] = {"read_s": round(best, 3), "tokens": tokens,
                               "mb_per_s": round(size / 1e6 / best, 1)}
                print(f"{where:6s} read {tokens:,} tokens in {best:.3f} s ({size / 1e6 / best:.1f} MB of corpus/s)")
        finally:
            procs.stop_all()
    rows["s3_over_local"] = round(rows["s3"]["read_s"] / rows["local"]["read_s"], 2)
    print(json.dumps({"bench": "s3_read", "corpus_mb": args.mb, **rows}))


if __name__ == "__main__":
    main()
