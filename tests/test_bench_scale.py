"""bench/scale.py: its corpus generator, its exponents, and a run at tiny sizes that ends with its JSON line."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench" / "scale.py"


def _scale():
    """bench/scale.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_corpus_is_seeded_zipfian_and_has_its_size(tmp_path, monkeypatch):
    scale = _scale()
    monkeypatch.setattr(scale, "CHUNK_WORDS", 7_000)  # several chunks, the last one short
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    scale.zipf_corpus(a, 30_000, 500)
    scale.zipf_corpus(b, 30_000, 500)
    assert a.read_bytes() == b.read_bytes()
    words = a.read_text().split()
    assert len(words) == 30_000
    counts = sorted((words.count(w) for w in set(words)), reverse=True)
    assert len(counts) <= 500
    assert counts[0] / counts[9] == pytest.approx(10, rel=0.3)  # rank 1 vs rank 10: 1/r


def test_sizes_and_exponents():
    scale = _scale()
    assert [scale.parse_size(s) for s in ("100k", "10M", "1B", "2500")] == [100_000, 10**7, 10**9, 2500]
    assert [scale.types_for(n) for n in (10**5, 10**7, 10**8, 10**9)] == [1_000, 10_000, 100_000, 800_000]
    a, b = {"tokens": 10**7, "prepare_s": 2.0, "val_s": None}, {"tokens": 10**8, "prepare_s": 20.0, "val_s": 1.0}
    assert scale.slope(a, b, "prepare_s") == pytest.approx(1.0)
    assert scale.slope(a, b, "val_s") is None
    rows = [{"tokens": 10**7, "startup_s": 5.0}, {"tokens": 10**9, "startup_s": 12.0, "startup_warm_s": 6.0}]
    met = scale.verdicts(rows, {"prepare_s": [1.2], "rank_peak_rss_mb": [0.01], "tokens_per_s": [None]})
    assert met == {"prepare_s": False, "rank_peak_rss_mb": True, "tokens_per_s": None, "startup_s": False,
                   "startup_warm_s": True}


@pytest.mark.slow
def test_a_tiny_run_ends_with_the_figures_and_exponents(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--sizes", "50k,100k", "--steps", "20", "--eval-every", "10",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "scale" and figures["sizes"] == ["50k", "100k"]
    assert set(figures["exponents"]) == {"prepare_s", "prepare_rss_mb", "startup_s", "startup_warm_s",
                                         "rank_peak_rss_mb", "tokens_per_s", "val_s"}
    assert all(len(v) == 1 and math.isfinite(v[0]) for v in figures["exponents"].values())
    assert set(figures["met"]) == {"prepare_s", "rank_peak_rss_mb", "tokens_per_s", "startup_s", "startup_warm_s"}
    assert figures["met"]["startup_s"] is None and figures["met"]["startup_warm_s"] is None  # no 1B row
    for row, tokens in zip(figures["rows"], (50_000, 100_000)):
        assert row["tokens"] == tokens and row["train_tokens"] + 2 * row["val_tokens"] >= 0.99 * tokens
        assert set(row["rank_peak_rss_by_rank_mb"]) == {"0", "1"}
        for cost in ("prepare_s", "prepare_rss_mb", "startup_s", "startup_warm_s", "rank_peak_rss_mb",
                     "tokens_per_s", "val_s"):
            assert row[cost] > 0, (cost, row)
    assert list(tmp_path.iterdir()) == []  # corpora, datasets, runs and the split cache are gone
