"""Issue 12, the data side: what heals heals, nothing unverified is kept, clear errors, bounded memory.

* line endings: one rule (``\\n``, ``\\r\\n``, lone ``\\r``) whatever the normalizer;
* over-long lines are cut at safe places: the same tokens as unchunked, memory bounded by ``chunk_bytes``;
* a corpus copy that fails its declared checksum is not kept;
* a corrupt prepared dataset (or corpus copy) is quarantined and rebuilt, with a warning naming the file;
* a read-only root: an error naming the root and what could not be written; an already
  prepared dataset still trains from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from pipeline.corpus import fetch_corpus
from pipeline.prepare import plan_chunks, prepare_dataset
from pipeline.tokenizer import char_codes, tokenize, word_tokens

REPO = Path(__file__).resolve().parents[1]

TOKENIZERS = {
    "char-d2l": TokenizerConfig(level="char"),
    "char-d2l-space": TokenizerConfig(level="char", newlines="space"),
    "char-none": TokenizerConfig(level="char", normalizer="none"),
    "char-lower": TokenizerConfig(level="char", normalizer="lower"),
    "word-d2l-eos": TokenizerConfig(level="word", eos=True),
    "word-none-eos": TokenizerConfig(level="word", normalizer="none", eos=True),
    "word-none-eos-empty": TokenizerConfig(level="word", normalizer="none", eos=True, eos_on_empty_lines=True),
    "word-lower": TokenizerConfig(level="word", normalizer="lower"),
}


# ----------------------------------------------------------------------- line endings


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_lone_cr_is_a_line_break_with_every_normalizer(name):
    cfg = TOKENIZERS[name].model_copy(update={"newlines": "keep"}) if name.startswith("char") else TOKENIZERS[name]
    assert tokenize("Ab cd\rEf\r\ngh\r\rij\n", cfg) == tokenize("Ab cd\nEf\ngh\n\nij\n", cfg)
    assert "\r" not in "".join(tokenize("a\rb", cfg))


# ------------------------------------------------------------------- over-long lines


def long_line_text(n: int = 40_000) -> str:
    """One long line of words, punctuation runs, non-ASCII and lone CRs, between short lines."""
    rng = np.random.default_rng(0)
    pieces = ["Time", "traveller", "--", "  ", "...", "caf\u00e9", "\u4e2d\u6587", "42", "\U0001f600", "x", "\t", "\r",
              "  ,;  ", "The", "machine", "<b>", " "]
    words = rng.choice(len(pieces), size=n)
    line = " ".join(pieces[i] for i in words)
    return "A short line\n\n" + line + "\n  \nand after\n" + line.replace("\r", "") + " end"


def chunk_tokens(path: Path, cfg: TokenizerConfig, chunk_bytes: int, root: Path) -> tuple[list, list]:
    docs = fetch_corpus((SourceConfig(url=str(path)),), str(root))
    chunks = plan_chunks(docs, chunk_bytes, cfg)
    tokens: list = []
    for c in chunks:
        data = c.read()
        if cfg.level == "char":
            tokens += [chr(x) for x in char_codes(data, cfg).tolist()]
        else:
            tokens += word_tokens(data, cfg, c.continues).to_pylist()
    return chunks, tokens


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_overlong_lines_are_cut_safely(tmp_path, name):
    cfg = TOKENIZERS[name]
    text = long_line_text()
    path = tmp_path / "long.txt"
    path.write_bytes(text.encode())
    chunks, tokens = chunk_tokens(path, cfg, 1024, tmp_path / "store")
    sizes = [c.end - c.start for c in chunks]
    assert len(text.encode()) > 100 * 1024 and max(sizes) <= 2 * 1024, max(sizes)
    assert sum(c.continues for c in chunks) > 100
    assert tokens == tokenize(text, cfg)


def test_overlong_line_dataset_equals_unchunked(tmp_path):
    path = tmp_path / "long.txt"
    path.write_bytes(long_line_text(20_000).encode())
    cfg = DataConfig(sources=(SourceConfig(url=str(path)),), tokenizer=TOKENIZERS["word-none-eos"], chunk_bytes=1024)
    small = prepare_dataset(cfg, str(tmp_path / "a"))
    whole = prepare_dataset(cfg.model_copy(update={"chunk_bytes": 2**26}), str(tmp_path / "b"))
    assert small.vocab == whole.vocab
    for split in ("train", "val", "test"):
        assert np.array_equal(small.split(split), whole.split(split))


MEMORY_PROBE = """
import json, sys, tracemalloc
import pyarrow as pa
import pipeline.corpus
from pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from pipeline.prepare import prepare_dataset

path, root, level = sys.argv[1:4]
pipeline.corpus.READ_BLOCK = 16 * 1024  # the fetch streams in small blocks too: measure the chunk steps
cfg = DataConfig(sources=(SourceConfig(url=path),), tokenizer=TokenizerConfig(level=level),
                 chunk_bytes=16 * 1024, tokens_per_shard=20_000)
with open(path + ".small", "w") as f:
    f.write("the time machine " * 50)
# Imports (some are lazy) are not the chunk steps' memory. Arrow's pool peak cannot be reset: a tiny warm-up.
prepare_dataset(cfg.model_copy(update={"sources": (SourceConfig(url=path + ".small"),)}), root)
tracemalloc.start()
ds = prepare_dataset(cfg, root)
print(json.dumps({"python": tracemalloc.get_traced_memory()[1], "arrow": pa.default_memory_pool().max_memory(),
                  "tokens": ds.num_tokens}))
"""


@pytest.mark.parametrize("level", ["char", "word"])
def test_memory_of_one_long_line_is_bounded_by_chunk_bytes(tmp_path, level):
    """An 8 MB file with no line break, 16 KB chunks: the chunk steps' peak (Python objects
    and numpy under tracemalloc, plus pyarrow's pool) stays far below the file size."""
    words = ["time", "traveller", "machine", "the", "of", "psychologist", "--", "42"]
    rng = np.random.default_rng(1)
    text = " ".join(words[i] for i in rng.integers(0, len(words), size=1_400_000))
    path = tmp_path / "one-line.txt"
    path.write_bytes(text.encode())
    size = path.stat().st_size
    assert size > 8 * 2**20 and b"\n" not in path.read_bytes()
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(tmp_path / "store"), level],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    assert peak["tokens"] > 500_000
    assert peak["python"] + peak["arrow"] < size / 4, peak
