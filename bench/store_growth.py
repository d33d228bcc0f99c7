"""How the storage root grows over nightly retrains, with and without ``rnnlm gc`` after each night.

Six nights (``--nights``) of the real ``retrain`` flow on a corpus that grows each night (the
first ``--tokens`` characters of The Time Machine plus a tenth more per night), the vocabulary
pinned to the champion's, a tiny GRU for one epoch; one root runs ``gc`` (the default policy, ages
set to 0 so the bench's minutes count as nights) after each night, the other never. Prints the
root's bytes after each night for both, then one JSON line. Prefect's own home lives outside both
roots (a temporary local server on SQLite).

    python bench/store_growth.py
    python bench/store_growth.py --nights 3 --tokens 3000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def du(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def config(corpus: Path):
    from pipeline.config import RunConfig

    return RunConfig.model_validate({
        "data": {"sources": [{"url": str(corpus)}], "tokenizer": {"level": "char"}, "chunk_bytes": 4096},
        "model": {"cell": "gru", "hidden_size": 32, "embed_size": 16, "init": "default"},
        "train": {"batch_size": 8, "num_steps": 16, "epochs": 1, "optimizer": "adam", "lr": 0.01}})


def run_nights(args, work: Path, text: str, policy, sizes: dict[str, list[int]]) -> None:
    """The real retrain flow once a night into each root, ``gc`` after it into one; ``sizes`` gets each root's bytes."""
    from flows.retrain import retrain_flow
    from pipeline.store.inventory import take_inventory
    from pipeline.store.retention import apply_plan, plan_retention
    from tasks.options import PipelineOptions

    for night in range(1, args.nights + 1):
        corpus = work / f"night-{night}.txt"
        corpus.write_text(text[:int(args.tokens * (1 + 0.1 * (night - 1)))], encoding="utf-8")
        for mode in sizes:
            root = str(work / mode)
            retrain_flow(config=config(corpus), preset="bench", options=PipelineOptions(
                root=root, pin_vocab="champion", sample_tokens=10, grace_s=5))
            if mode == "gc":
                apply_plan(plan_retention(take_inventory(root), policy))
            sizes[mode].append(du(root))
        print(f"night {night}: with gc {sizes['gc'][-1]:>10,} B   without {sizes['no_gc'][-1]:>10,} B", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nights", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=6000, help="characters of the first night's corpus")
    args = parser.parse_args()

    from flows.servers import TELEMETRY_OFF

    os.environ.update(TELEMETRY_OFF)
    work = Path(tempfile.mkdtemp(prefix="store-growth-"))
    os.environ["PREFECT_HOME"] = str(work / "prefect-home")
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    from pipeline.config import RetentionConfig
    from pipeline.data.corpus import builtin_path

    text = Path(builtin_path("builtin://timemachine")).read_text(encoding="utf-8")
    policy = RetentionConfig(min_age_hours=0, staging_max_age_hours=0)
    sizes: dict[str, list[int]] = {"gc": [], "no_gc": []}
    try:
        with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120}):
            run_nights(args, work, text, policy, sizes)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # two roots and a Prefect home: nothing to keep once measured
    n = args.nights
    print(json.dumps({"nights": n, "tokens": args.tokens, "bytes_per_night_gc": sizes["gc"],
                      "bytes_per_night_no_gc": sizes["no_gc"],
                      "gc_growth_last_over_middle": round(sizes["gc"][-1] / sizes["gc"][max(0, n // 2 - 1)], 3),
                      "no_gc_growth_last_over_middle": round(sizes["no_gc"][-1] / sizes["no_gc"][max(0, n // 2 - 1)], 3)}))


if __name__ == "__main__":
    main()
