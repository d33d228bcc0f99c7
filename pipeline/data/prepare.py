"""Raw corpus -> vocabulary -> Parquet shards, streaming in line-aligned chunks.

The ONE definition of the data chain::

    documents = fetch_corpus(cfg.sources)              # verified, content-addressed copies
    chunks    = plan_chunks(documents, cfg.chunk_bytes, cfg.tokenizer) # byte ranges that end on a newline (or a safe cut)
    counted   = build_vocab((count_chunk(c, cfg.tokenizer) for c in chunks), cfg)
    write_dataset(uri, documents, cfg, counted, (encode_chunk(c, cfg.tokenizer, counted.vocab) for c in chunks))

Each chunk step touches one chunk, so memory is bounded by the chunk size, not the
corpus (a line longer than a chunk is cut inside, where cutting changes no token), and is a pure function of (chunk, config), so an orchestrator can map it over
workers. ``prepare_dataset`` runs the chain in one process; the ``prepare-data`` flow
(``tasks/data.py``) calls these same functions, only persisting what passes between
them, and ``tests/test_flows.py`` checks the two write the same bytes. The dataset
directory is named by a hash of the source hashes and the config, so the same inputs
always land in the same place and a finished dataset is reused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import progress, storage
from pipeline.code_version import code_digest
from pipeline.config import DataConfig, TokenizerConfig
from pipeline.data.corpus import Document, fetch_corpus, located_sources
from pipeline.errors import ConfigError, CorpusError, PipelineError
from pipeline.data.integrity import verified_dataset
from pipeline.data.shards import SPLITS, Dataset, DatasetWriter, open_dataset, read_pinned_vocab, split_bounds
from pipeline.data.tokenizer import UNK, char_codes, safe_cuts, word_tokens
from pipeline.data.vocab import (TokenCounts, Vocab, count_codes, count_table, count_values, merge_count_tables,
                                  total_count)

log = logging.getLogger(__name__)

# Bump when tokenization or the shard format changes meaning: it is part of every dataset's address.
# 2: a lone \r is a line break with every normalizer (it was a token with ``none`` / ``lower``).
DATA_FORMAT_VERSION = 2
SCAN_BLOCK = 64 * 1024


@dataclass(frozen=True)
class Chunk:
    """Bytes ``[start, end)`` of a fetched document; ``end`` is just past a newline, at EOF,
    or (``continues``) at a ``safe_cut`` inside a line longer than a chunk."""

    uri: str
    start: int
    end: int
    split: str | None = None  # the split its source names, if any
    source: str = ""  # the source as the user wrote it, for errors
    continues: bool = False  # cut inside a line: the next chunk holds the rest of it

    def read(self) -> bytes:
        fs, path = storage.filesystem(self.uri)
        with fs.open(path, "rb") as f:
            f.seek(self.start)
            return f.read(self.end - self.start)


def dataset_id(documents: list[Document], cfg: DataConfig, pinned_sha256: str | None = None) -> str:
    """The content address of a dataset: what the text is, how it is cut and the code that cuts it
    (``pipeline.code_version``), never where it came from.

    ``pinned_sha256``: the token hash of the ``vocab.pinned`` vocabulary (its content, not its URI).
    """
    if (cfg.vocab.pinned is None) != (pinned_sha256 is None):
        raise ValueError("dataset_id needs the pinned vocabulary's token hash exactly when vocab.pinned is set")
    settings = cfg.model_dump(mode="json", exclude={"sources": True, "chunk_bytes": True, "root_dir": True,
                                                    "vocab": {"pinned"}})
    if pinned_sha256:
        settings["pinned_vocab"] = pinned_sha256
    docs = [d.sha256 if d.split is None else [d.split, d.sha256] for d in documents]
    # The code that tokenizes and writes it too: an upgrade never reuses a dataset it would cut differently.
    return storage.stable_hash({"version": DATA_FORMAT_VERSION, "code": code_digest("shards"), "documents": docs,
                                "settings": settings})


def plan_chunks(documents: list[Document], chunk_bytes: int, tokenizer: TokenizerConfig | None = None) -> list[Chunk]:
    """Cut every document into chunks of about ``chunk_bytes`` that end on line boundaries.

    A line that runs on for ``chunk_bytes`` past a chunk's nominal end is cut inside, at
    the first ``safe_cut`` for ``tokenizer`` after that end, so a chunk stays under about
    ``2 * chunk_bytes`` whatever the lines (one 60 MB line is not one 60 MB chunk).
    Without a tokenizer (or a safe cut) lines are never cut.
    """
    chunks = []
    for doc in documents:
        fs, path = storage.filesystem(doc.uri)
        with fs.open(path, "rb") as f:
            start = 0
            while start < doc.num_bytes:
                end, continues = min(start + chunk_bytes, doc.num_bytes), False
                if end < doc.num_bytes:
                    end, continues = _chunk_end(f, end, doc.num_bytes, chunk_bytes, tokenizer)
                chunks.append(Chunk(doc.uri, start, end, doc.split, doc.source, continues))
                start = end
    return chunks


def _chunk_end(f, pos: int, size: int, limit: int, tokenizer: TokenizerConfig | None) -> tuple[int, bool]:
    """``(end, continues)``: just past the first newline at or after ``pos`` (or EOF); if no
    newline comes within ``limit`` bytes, the first safe cut after ``pos`` instead."""
    f.seek(pos - 1)
    before, cut, scanned = f.read(1)[0], None, 0
    while pos < size:
        in_window = scanned < limit
        block = f.read(min(SCAN_BLOCK, limit - scanned) if in_window else SCAN_BLOCK)
        if not block:
            break
        nl = block.find(b"\n")
        if nl >= 0 and in_window:
            return pos + nl + 1, False
        if cut is None and tokenizer is not None:
            cuts = safe_cuts(block if nl < 0 else block[:nl], before, tokenizer)
            cut = pos + int(cuts[0]) if cuts.size else None
        if nl >= 0:  # past the window, with no cut before it (else we would have stopped)
            return (cut, True) if cut is not None else (pos + nl + 1, False)
        before = block[-1]
        pos += len(block)
        scanned += len(block)
        if cut is not None and scanned >= limit:
            return cut, True
    return size, False


def count_chunk(chunk: Chunk, cfg: TokenizerConfig, spill: str | None = None,
                as_table: bool = False) -> TokenCounts | pa.Table:
    """Token counts of one chunk, in first-occurrence order.

    ``as_table`` (word level): a ``vocab.count_table`` instead of a dict, which holds a
    chunk's million-odd distinct words in a fraction of the memory.

    ``spill`` (char level, one process): a local ``.npy`` path to keep the chunk's code
    points in for ``encode_chunk``. Normalizing is most of a char-level chunk's work and
    the encode pass would repeat it; reading the codes back (a byte a token for ASCII)
    is nearly free. The result is the same with or without it.
    """
    data = chunk.read()
    if cfg.level == "word" and cfg.normalizer == "d2l" and UNK.encode() in data:
        raise CorpusError(chunk.source or chunk.uri, f"holds literal {UNK} markers, which the d2l normalizer would turn "
                          "into the word 'unk': use tokenizer.normalizer none (or lower) for this corpus")
    if cfg.level == "char":
        codes = char_codes(data, cfg)
        if spill:
            np.save(spill, codes)
        return count_codes(codes)
    words = word_tokens(data, cfg, chunk.continues)
    return count_table(words) if as_table else count_values(words)


@dataclass(frozen=True)
class CountedVocab:
    """The vocabulary, and the tokens counted: in all (``num_tokens``) and per named split (else None)."""

    vocab: Vocab
    num_tokens: int
    distinct: int
    split_tokens: dict[str, int] | None = None


def pinned_vocab(cfg: DataConfig) -> Vocab | None:
    """The vocabulary ``vocab.pinned`` names (verified), or None. A dataset's must come from this tokenizer."""
    pin = cfg.vocab.pinned
    if pin is None:
        return None
    vocab, manifest = read_pinned_vocab(pin.uri, pin.sha256)
    if manifest is not None and TokenizerConfig.model_validate(manifest["tokenizer"]) != cfg.tokenizer:
        raise ConfigError(f"vocab.pinned: {pin.uri} was tokenized with {manifest['tokenizer']}, this dataset with "
                          f"{cfg.tokenizer.model_dump(mode='json')}: its vocabulary does not fit")
    return vocab


def build_vocab(chunks: Sequence[Chunk], counts: Iterable[TokenCounts | pa.Table], cfg: DataConfig,
                pinned: Vocab | None = None) -> CountedVocab:
    """Merge the counts of ``chunks`` (in chunk order) and build the d2l vocabulary from them.

    With ``vocab.count_on=train`` only the train chunks' counts make the vocabulary;
    every chunk's tokens are tallied for the split sizes. No tokens to build on is an error.
    ``pinned`` (``pinned_vocab``): keep that vocabulary's tokens, recounted on this corpus.
    """
    tally: dict[str, int] = {}

    def vocab_counts():
        for chunk, part in zip(chunks, counts, strict=True):
            tally[chunk.split or "all"] = tally.get(chunk.split or "all", 0) + total_count(part)
            if cfg.vocab.count_on == "all" or chunk.split == "train":
                yield part

    merged = merge_count_tables(vocab_counts())  # Arrow: very many types stay compact
    if not len(merged):
        counted_on = [s.url for s in cfg.sources if cfg.vocab.count_on == "all" or s.split == "train"]
        raise CorpusError(", ".join(counted_on), "no tokens after normalization")
    vocab = Vocab.recount(pinned.tokens, merged) if pinned else Vocab.build(merged, cfg.vocab)
    num_tokens = sum(tally.values())
    log.info("vocabulary: %d tokens from %d distinct (counted on %s); %d tokens in the corpus",
             len(vocab), len(merged), cfg.vocab.count_on, num_tokens)
    split_tokens = {split: tally.get(split, 0) for split in SPLITS} if cfg.named_splits else None
    return CountedVocab(vocab, num_tokens, len(merged), split_tokens)


def encode_chunk(chunk: Chunk, cfg: TokenizerConfig, vocab: Vocab, spill: str | None = None) -> np.ndarray:
    """Token ids of one chunk (unknown tokens -> 0); ``spill``: the codes ``count_chunk`` kept (then removed)."""
    if cfg.level == "char":
        if spill:
            codes = np.load(spill)
            os.remove(spill)
        else:
            codes = char_codes(chunk.read(), cfg)
        return vocab.encode_codes(codes)
    return vocab.encode_words(word_tokens(chunk.read(), cfg, chunk.continues))


def dataset_uri(documents: list[Document], cfg: DataConfig, root: str, pinned_sha256: str | None = None) -> str:
    return storage.join(root, "datasets", dataset_id(documents, cfg, pinned_sha256))


def prepare_dataset(cfg: DataConfig, root: str | None = None) -> Dataset:
    """Fetch, count, build the vocabulary and write shards in this process; reuse a finished dataset.

    The ``prepare-data`` flow maps the same chunk steps over workers and writes the same bytes.
    """
    root = storage.storage_root(root)
    started = time.perf_counter()
    documents = fetch_corpus(located_sources(cfg), root)
    pinned = pinned_vocab(cfg)
    uri = dataset_uri(documents, cfg, root, pinned.sha256 if pinned else None)
    if (ready := verified_dataset(uri, root)) is not None:
        log.info("dataset already prepared at %s", uri)
        return ready

    chunks = plan_chunks(documents, cfg.chunk_bytes, cfg.tokenizer)
    log.info("counting %d chunk(s) of %d document(s)", len(chunks), len(documents))
    with tempfile.TemporaryDirectory(prefix="rnnlm-codes-") as spill_dir:
        spill = [os.path.join(spill_dir, f"{i:06d}.npy") if cfg.tokenizer.level == "char" else None
                 for i in range(len(chunks))]
        counts = _logged(range(len(chunks)), "count", lambda i: count_chunk(chunks[i], cfg.tokenizer, spill[i], as_table=True))
        counted = build_vocab(chunks, counts, cfg, pinned)
        encode = _logged(range(len(chunks)), "encode", lambda i: encode_chunk(chunks[i], cfg.tokenizer, counted.vocab, spill[i]))
        with contextlib.closing(encode) as encoded:  # a max_tokens cap stops early: join the workers before cleanup
            write_dataset(uri, documents, cfg, counted, encoded)
    log.info("prepared in %.1f s", time.perf_counter() - started)
    return open_dataset(uri)


def write_dataset(uri, documents, cfg: DataConfig, counted: CountedVocab, encoded_chunks) -> dict:
    """Write shards from consecutive encoded chunks into a staging directory, then publish it."""
    staging = storage.new_staging_dir(uri)
    bounds = split_bounds(counted.num_tokens, counted.split_tokens, cfg.splits)
    writer = DatasetWriter(staging, counted.vocab, bounds, cfg.tokens_per_shard)
    try:
        for ids in encoded_chunks:
            writer.add(ids)
            if writer.position >= writer.total:
                break
        manifest = writer.finish(
            {
                "dataset_id": uri.rstrip("/").rsplit("/", 1)[-1],
                "sources": [d.to_dict() for d in documents],
                "split_sources": {s: [d.source for d in documents if d.split == s] for s in SPLITS} if cfg.named_splits else None,
                "tokenizer": cfg.tokenizer.model_dump(mode="json"),
                "config": cfg.model_dump(mode="json"),
                "corpus_tokens": counted.num_tokens,
                "format_version": DATA_FORMAT_VERSION,
            }
        )
    except BaseException as e:
        with contextlib.suppress(Exception):  # the original error is the one to report
            writer.close()  # and no write may land in the staging dir after it is removed
        fs, path = storage.filesystem(staging)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        if isinstance(e, OSError) and not isinstance(e, PipelineError) and storage.is_unwritable(e):
            raise storage.unwritable(uri.rstrip("/").rsplit("/", 2)[0], f"the dataset {uri}", e) from None
        raise
    storage.publish_dir(staging, uri)
    log.info("dataset %s: %d tokens (train %d, val %d, test %d), vocab %d", manifest["dataset_id"], manifest["num_tokens"],
             *(manifest["splits"][s]["num_tokens"] for s in SPLITS), manifest["vocab_size"])
    return manifest


def _logged(chunks: Sequence, verb: str, fn, workers: int = 2):
    """Yield ``fn(chunk)`` for each chunk, in order, computed on ``workers`` threads.

    Most of a chunk's work (numpy, pyarrow, hashing, file I/O) runs without the GIL,
    so two chunks in flight use two cores; memory stays at ``workers`` chunks.
    Progress is logged every few seconds on long corpora, and published per chunk (``pipeline.progress``).
    """
    last = time.perf_counter()
    done = 0

    def finished(result):
        nonlocal done
        done += 1
        progress.publish({"event": "progress", "stage": "prepare", "phase": verb, "done": done, "total": len(chunks)})
        return result

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=verb) as pool:
        in_flight: deque = deque()
        for i, chunk in enumerate(chunks):
            in_flight.append(pool.submit(fn, chunk))
            if len(in_flight) >= workers:
                yield finished(in_flight.popleft().result())
            if time.perf_counter() - last > 5:
                log.info("%s: %d/%d chunks", verb, i + 1, len(chunks))
                last = time.perf_counter()
        while in_flight:
            yield finished(in_flight.popleft().result())


def summary(dataset: Dataset) -> dict:
    """The headline numbers of a dataset, for logs and the CLI."""
    m = dataset.manifest
    return {
        "uri": dataset.uri,
        "dataset_id": m["dataset_id"],
        "sources": [{"source": s["source"], "split": s.get("split"), "sha256": s["sha256"], "bytes": s["num_bytes"]}
                    for s in m["sources"]],
        "level": m["tokenizer"]["level"],
        "num_tokens": m["num_tokens"],
        "vocab_size": m["vocab_size"],
        "splits": {k: v["num_tokens"] for k, v in m["splits"].items()},
    }

