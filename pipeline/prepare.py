"""Raw corpus -> vocabulary -> Parquet shards, streaming in line-aligned chunks.

    documents = fetch_corpus(cfg.sources)          # verified, content-addressed copies
    chunks    = plan_chunks(documents, cfg)        # byte ranges that end on a newline
    counts    = merge_counts(count_chunk(c, cfg) for c in chunks)
    vocab     = Vocab.build(counts, cfg.vocab)
    for c in chunks: writer.add(encode_chunk(c, cfg, vocab))

Each step touches one chunk at a time, so memory is bounded by the chunk size,
not the corpus; and each chunk step is a pure function of (chunk, config), so
an orchestrator can map them over workers. ``prepare_dataset`` runs the whole
chain in one process. The dataset directory is named by a hash of the source
hashes and the config, so the same inputs always land in the same place and a
finished dataset is reused.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.config import DataConfig, TokenizerConfig
from pipeline.corpus import Document, fetch_corpus
from pipeline.errors import CorpusError
from pipeline.shards import Dataset, DatasetWriter, is_complete, open_dataset, split_sizes
from pipeline.tokenizer import char_codes, word_tokens
from pipeline.vocab import TokenCounts, Vocab, count_codes, count_values, merge_counts

log = logging.getLogger(__name__)

# Bump when tokenization or the shard format changes meaning: it is part of every dataset's address.
DATA_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Chunk:
    """Bytes ``[start, end)`` of a fetched document; ``end`` is just past a newline or at EOF."""

    uri: str
    start: int
    end: int

    def read(self) -> bytes:
        fs, path = storage.filesystem(self.uri)
        with fs.open(path, "rb") as f:
            f.seek(self.start)
            return f.read(self.end - self.start)


def dataset_id(documents: list[Document], cfg: DataConfig) -> str:
    """The content address of a dataset: what the text is and how it is cut, never where it came from."""
    settings = cfg.model_dump(mode="json", exclude={"sources", "chunk_bytes"})
    return storage.stable_hash({"version": DATA_FORMAT_VERSION, "documents": [d.sha256 for d in documents], "settings": settings})


def plan_chunks(documents: list[Document], chunk_bytes: int) -> list[Chunk]:
    """Cut every document into chunks of about ``chunk_bytes`` that end on line boundaries."""
    chunks = []
    for doc in documents:
        fs, path = storage.filesystem(doc.uri)
        with fs.open(path, "rb") as f:
            start = 0
            while start < doc.num_bytes:
                end = min(start + chunk_bytes, doc.num_bytes)
                if end < doc.num_bytes:
                    end = _next_line_end(f, end, doc.num_bytes)
                chunks.append(Chunk(doc.uri, start, end))
                start = end
    return chunks


def _next_line_end(f, pos: int, size: int) -> int:
    """The position just past the first newline at or after ``pos`` (or EOF)."""
    f.seek(pos)
    while pos < size:
        block = f.read(64 * 1024)
        if not block:
            break
        nl = block.find(b"\n")
        if nl >= 0:
            return pos + nl + 1
        pos += len(block)
    return size


def count_chunk(chunk: Chunk, cfg: TokenizerConfig) -> TokenCounts:
    """Token counts of one chunk, in first-occurrence order."""
    data = chunk.read()
    if cfg.level == "char":
        return count_codes(char_codes(data, cfg))
    return count_values(word_tokens(data, cfg))


def encode_chunk(chunk: Chunk, cfg: TokenizerConfig, vocab: Vocab) -> np.ndarray:
    """Token ids of one chunk (unknown tokens -> 0)."""
    data = chunk.read()
    if cfg.level == "char":
        return vocab.encode_codes(char_codes(data, cfg))
    return vocab.encode_words(word_tokens(data, cfg))


class CodeSpill:
    """Char level, one process: keep each chunk's code points on local disk between the passes.

    Normalizing is most of the work of a char-level chunk, and the encode pass would
    repeat it; reading the counted codes back (one byte a token for ASCII text) is
    nearly free, and memory stays at one chunk. ``count``/``encode`` give exactly what
    ``count_chunk``/``encode_chunk`` give.
    """

    def __init__(self, directory: str):
        self.directory = directory

    def _path(self, i: int) -> str:
        return os.path.join(self.directory, f"{i:06d}.npy")

    def count(self, i: int, chunk: Chunk, cfg: TokenizerConfig) -> TokenCounts:
        codes = char_codes(chunk.read(), cfg)
        np.save(self._path(i), codes)
        return count_codes(codes)

    def encode(self, i: int, vocab: Vocab) -> np.ndarray:
        codes = np.load(self._path(i))
        os.remove(self._path(i))
        return vocab.encode_codes(codes)


def prepare_dataset(cfg: DataConfig, root: str | None = None) -> Dataset:
    """Fetch, count, build the vocabulary and write shards; reuse a finished dataset."""
    root = storage.storage_root(root)
    started = time.perf_counter()
    documents = fetch_corpus(cfg.sources, root)
    did = dataset_id(documents, cfg)
    uri = storage.join(root, "datasets", did)
    if is_complete(uri):
        log.info("dataset %s already prepared at %s", did, uri)
        return open_dataset(uri)

    chunks = plan_chunks(documents, cfg.chunk_bytes)
    log.info("counting %d chunk(s) of %d document(s)", len(chunks), len(documents))
    with tempfile.TemporaryDirectory(prefix="rnnlm-codes-") as spill_dir:
        spill = CodeSpill(spill_dir) if cfg.tokenizer.level == "char" else None
        if spill:
            counts = merge_counts(_logged(list(enumerate(chunks)), "count", lambda ic: spill.count(*ic, cfg.tokenizer)))
        else:
            counts = merge_counts(_logged(chunks, "count", lambda c: count_chunk(c, cfg.tokenizer)))
        vocab = Vocab.build(counts, cfg.vocab)
        num_tokens = sum(counts.values())
        if num_tokens == 0:
            raise CorpusError(", ".join(s.url for s in cfg.sources), "no tokens after normalization")
        log.info("vocabulary: %d tokens from %d distinct; %d tokens in the corpus", len(vocab), len(counts), num_tokens)

        if spill:
            encoded = _logged(list(range(len(chunks))), "encode", lambda i: spill.encode(i, vocab))
        else:
            encoded = _logged(chunks, "encode", lambda c: encode_chunk(c, cfg.tokenizer, vocab))
        manifest = write_dataset(uri, documents, cfg, vocab, num_tokens, encoded)
    log.info(
        "dataset %s: %d tokens (train %d, val %d, test %d), vocab %d, %.1f s",
        did, manifest["num_tokens"], *(manifest["splits"][s]["num_tokens"] for s in ("train", "val", "test")),
        manifest["vocab_size"], time.perf_counter() - started,
    )
    return open_dataset(uri)


def write_dataset(uri, documents, cfg: DataConfig, vocab: Vocab, num_tokens: int, encoded_chunks) -> dict:
    """Write shards from consecutive encoded chunks into a staging directory, then publish it."""
    total = min(num_tokens, cfg.splits.max_tokens or num_tokens)
    sizes = split_sizes(total, cfg.splits.model_dump())
    staging = storage.new_staging_dir(uri)
    writer = DatasetWriter(staging, vocab, sizes, cfg.tokens_per_shard)
    try:
        for ids in encoded_chunks:
            writer.add(ids)
            if writer.position >= writer.total:
                break
        manifest = writer.finish(
            {
                "dataset_id": uri.rstrip("/").rsplit("/", 1)[-1],
                "sources": [d.to_dict() for d in documents],
                "tokenizer": cfg.tokenizer.model_dump(mode="json"),
                "config": cfg.model_dump(mode="json"),
                "corpus_tokens": num_tokens,
                "format_version": DATA_FORMAT_VERSION,
            }
        )
    except BaseException:
        with contextlib.suppress(Exception):  # the original error is the one to report
            writer.close()  # and no write may land in the staging dir after it is removed
        fs, path = storage.filesystem(staging)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        raise
    storage.publish_dir(staging, uri)
    return manifest


def _logged(chunks: list, verb: str, fn, workers: int = 2):
    """Yield ``fn(chunk)`` for each chunk, in order, computed on ``workers`` threads.

    Most of a chunk's work (numpy, pyarrow, hashing, file I/O) runs without the GIL,
    so two chunks in flight use two cores; memory stays at ``workers`` chunks.
    Progress is logged every few seconds on long corpora.
    """
    last = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=verb) as pool:
        in_flight: deque = deque()
        for i, chunk in enumerate(chunks):
            in_flight.append(pool.submit(fn, chunk))
            if len(in_flight) >= workers:
                yield in_flight.popleft().result()
            if time.perf_counter() - last > 5:
                log.info("%s: %d/%d chunks", verb, i + 1, len(chunks))
                last = time.perf_counter()
        while in_flight:
            yield in_flight.popleft().result()


def summary(dataset: Dataset) -> dict:
    """The headline numbers of a dataset, for logs and the CLI."""
    m = dataset.manifest
    return {
        "uri": dataset.uri,
        "dataset_id": m["dataset_id"],
        "sources": [{"source": s["source"], "sha256": s["sha256"], "bytes": s["num_bytes"]} for s in m["sources"]],
        "level": m["tokenizer"]["level"],
        "num_tokens": m["num_tokens"],
        "vocab_size": m["vocab_size"],
        "splits": {k: v["num_tokens"] for k, v in m["splits"].items()},
    }

