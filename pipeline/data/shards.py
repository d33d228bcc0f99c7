"""Prepared datasets: token ids in Parquet shards, the vocabulary, and a manifest.

A dataset directory holds::

    train-00000.parquet ...   one uint column ``ids`` per shard (narrowest type for the vocabulary)
    val-00000.parquet ...
    test-00000.parquet ...
    vocab.parquet             index, token, count
    manifest.json             written last: what is here, with sha256 of every file

Shards are written with byte-stream-split encoding and LZ4 (see ``_shard_bytes``),
a local read is a memory map, and every read verifies the sha256 recorded in
the manifest. A directory without ``manifest.json`` is incomplete.
"""

from __future__ import annotations

import io
import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import SplitConfig
from pipeline.errors import DatasetError
from pipeline.data.vocab import Vocab

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
VOCAB_FILE = "vocab.parquet"


def split_sizes(num_tokens: int, fractions: dict[str, float]) -> dict[str, int]:
    """Contiguous split sizes; val and test are rounded, train takes the rest."""
    val = round(num_tokens * fractions["val"])
    test = round(num_tokens * fractions["test"])
    return {"train": num_tokens - val - test, "val": val, "test": test}


def split_bounds(num_tokens: int, split_tokens: dict[str, int] | None, splits: SplitConfig) -> list[tuple[str, int, int]]:
    """``(split, start, end)`` of each split in the stream of a corpus's tokens; tokens outside are dropped.

    Fractions cut the stream after the ``max_tokens`` cap; named splits (``split_tokens``,
    each split's files back to back) are their files' tokens, the cap keeping the first
    tokens of train only.
    """
    cap = splits.max_tokens
    if split_tokens is None:
        sizes = split_sizes(min(num_tokens, cap or num_tokens), splits.model_dump())
        split_tokens, cap = sizes, None
    bounds, start = [], 0
    for split in SPLITS:
        n = split_tokens[split]
        bounds.append((split, start, start + (min(n, cap) if split == "train" and cap else n)))
        start += n
    return bounds


def parquet_bytes(table: pa.Table) -> bytes:
    """A small uncompressed Parquet file (the vocabulary, intermediate results)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="none", use_dictionary=False)
    return sink.getvalue()


def _shard_bytes(ids: np.ndarray) -> bytes:
    """A shard file. Parquet has no 8- or 16-bit physical type, so ids are stored as
    INT32; byte-stream-split plus LZ4 squeezes the always-zero high bytes out, making a
    shard about one byte per uint8 token instead of four (cheaper to write, hash and
    read back). Needs pyarrow >= 17 to read. Written to an Arrow buffer, not a Python
    file object, so the whole encode runs without the GIL."""
    sink = pa.BufferOutputStream()
    pq.write_table(
        pa.table({"ids": ids}), sink, compression="lz4", use_dictionary=False, column_encoding={"ids": "BYTE_STREAM_SPLIT"}
    )
    return memoryview(sink.getvalue())


class DatasetWriter:
    """Routes a stream of token ids into contiguous train/val/test shards.

    Feed ``add`` the ids of consecutive chunks. ``bounds`` — ``(split, start, end)``
    positions in that stream, known up front from counting — decide the split a
    token falls in by its position alone; tokens outside every split are dropped
    (the ``max_tokens`` cap).

    Shards are encoded, hashed and written on two background threads (pyarrow,
    hashlib and file I/O release the GIL), overlapping the tokenizing of the next
    chunk; at most ``MAX_IN_FLIGHT`` shards wait, so memory stays bounded.
    """

    MAX_IN_FLIGHT = 8

    def __init__(self, directory: str, vocab: Vocab, bounds: list[tuple[str, int, int]], tokens_per_shard: int):
        self.directory = directory
        self.vocab = vocab
        self.dtype = vocab.id_dtype
        self.tokens_per_shard = tokens_per_shard
        self.bounds = bounds  # (split, first position, end position)
        self.total = max(end for _, _, end in bounds)
        self.position = 0
        self.pending: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.pending_len = dict.fromkeys(SPLITS, 0)
        self.shards: dict[str, list[dict]] = {s: [] for s in SPLITS}
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-writer")
        self._in_flight: deque[Future] = deque()

    def add(self, ids: np.ndarray) -> None:
        ids = ids[: max(self.total - self.position, 0)]
        begin, end = self.position, self.position + len(ids)
        for split, lo, hi in self.bounds:
            a, b = max(lo, begin), min(hi, end)
            if a < b:
                self._buffer(split, ids[a - begin : b - begin])
        self.position = end

    def _buffer(self, split: str, ids: np.ndarray) -> None:
        self.pending[split].append(ids.astype(self.dtype, copy=False))
        self.pending_len[split] += len(ids)
        while self.pending_len[split] >= self.tokens_per_shard:
            self._flush(split, self.tokens_per_shard)

    def _flush(self, split: str, n: int) -> None:
        # Take the first n ids without copying the rest: a chunk's ids are sliced into
        # shards, not concatenated again for every shard cut from them.
        parts, rest, taken = [], [], 0
        for ids in self.pending[split]:
            if taken < n:
                k = min(n - taken, len(ids))
                parts.append(ids[:k])
                taken += k
                if k < len(ids):
                    rest.append(ids[k:])
            else:
                rest.append(ids)
        shard = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.pending[split] = rest
        self.pending_len[split] -= len(shard)
        entry = {"file": f"{split}-{len(self.shards[split]):05d}.parquet", "num_tokens": int(len(shard))}
        self.shards[split].append(entry)
        while len(self._in_flight) >= self.MAX_IN_FLIGHT:
            self._in_flight.popleft().result()  # re-raises a failed write here
        self._in_flight.append(self._io.submit(self._write_shard, entry, shard))

    def _write_shard(self, entry: dict, shard: np.ndarray) -> None:
        data = _shard_bytes(shard)
        storage.write_bytes_atomic(storage.join(self.directory, entry["file"]), data)
        entry["sha256"] = storage.sha256_bytes(data)

    def close(self) -> None:
        """Wait for every shard write (raising the first failure) and stop the writer thread."""
        try:
            while self._in_flight:
                self._in_flight.popleft().result()
        finally:
            self._io.shutdown(wait=True, cancel_futures=True)

    def finish(self, manifest_fields: dict) -> dict:
        """Write the last shards, the vocabulary, and (last) the manifest; return the manifest."""
        if self.position < self.total:
            raise DatasetError(f"{self.directory}: expected {self.total} tokens, got {self.position}")
        for split in SPLITS:
            if self.pending_len[split]:
                self._flush(split, self.pending_len[split])
        self.close()
        vocab_bytes = parquet_bytes(self.vocab.to_table())
        storage.write_bytes_atomic(storage.join(self.directory, VOCAB_FILE), vocab_bytes)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            **manifest_fields,
            "vocab": {"file": VOCAB_FILE, "sha256": storage.sha256_bytes(vocab_bytes), "tokens_sha256": self.vocab.sha256},
            "vocab_size": len(self.vocab),
            "num_tokens": self.total,
            "dtype": self.dtype.name,
            "splits": {s: {"num_tokens": sum(x["num_tokens"] for x in self.shards[s]), "shards": self.shards[s]} for s in SPLITS},
        }
        storage.write_json_atomic(storage.join(self.directory, MANIFEST), manifest)
        return manifest


@dataclass(frozen=True)
class Dataset:
    """A prepared dataset on any storage; every file read is checked against the manifest."""

    uri: str
    manifest: dict

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def num_tokens(self) -> int:
        return self.manifest["num_tokens"]

    @property
    def dataset_id(self) -> str:
        return self.manifest["dataset_id"]

    @cached_property
    def vocab(self) -> Vocab:
        return read_vocab(storage.join(self.uri, VOCAB_FILE), self.manifest["vocab"]["sha256"])

    def split(self, name: str) -> np.ndarray:
        """All token ids of a split as one array (in the manifest's dtype)."""
        if name not in self.manifest["splits"]:
            raise DatasetError(f"dataset {self.uri} has no split {name!r}; it has {', '.join(self.manifest['splits'])}")
        info = self.manifest["splits"][name]
        parts = list(self.iter_shards(name))
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=self.manifest["dtype"])
        if len(ids) != info["num_tokens"]:
            raise DatasetError(f"split {name!r} of {self.uri}: manifest says {info['num_tokens']} tokens, shards hold {len(ids)}")
        return ids

    def iter_shards(self, name: str) -> Iterator[np.ndarray]:
        for shard in self.manifest["splits"][name]["shards"]:
            url = storage.join(self.uri, shard["file"])
            table = _read_verified(url, shard["sha256"])
            if table.column_names != ["ids"] or len(table) != shard["num_tokens"]:
                raise DatasetError(f"corrupt shard {url}: expected one column 'ids' of {shard['num_tokens']} rows")
            yield table.column("ids").to_numpy()


def open_dataset(uri: str) -> Dataset:
    """Open a prepared dataset; a missing or unreadable manifest is an error naming the directory."""
    url = storage.join(uri, MANIFEST)
    try:
        manifest = storage.read_json(url)
    except FileNotFoundError:
        raise DatasetError(f"no dataset at {uri}: {MANIFEST} is missing (not prepared, or an interrupted write)") from None
    except ValueError as e:
        raise DatasetError(f"corrupt manifest {url}: {e}") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(f"{url}: schema_version {manifest.get('schema_version')!r}, this code reads {SCHEMA_VERSION}")
    return Dataset(uri=uri, manifest=manifest)


def read_vocab(url: str, sha256: str | None = None) -> Vocab:
    """A vocabulary file (``Vocab.to_table`` as Parquet), checked against ``sha256`` when given."""
    table = _read_verified(url, sha256, "vocabulary")
    try:
        return Vocab.from_table(table)
    except (KeyError, ValueError) as e:
        raise DatasetError(f"corrupt vocabulary {url}: {e}") from None


def read_pinned_vocab(uri: str, sha256: str | None = None) -> tuple[Vocab, dict | None]:
    """A vocabulary to reuse (``vocab.pinned``): a dataset directory's or a ``vocab.parquet``.

    ``sha256`` is that vocab.parquet's; a dataset's is also checked against its manifest.
    Returns the vocabulary and the dataset's manifest (None for a bare file).
    """
    if uri.rstrip("/").endswith(".parquet"):
        return read_vocab(uri, sha256), None
    ds = open_dataset(uri)
    recorded = ds.manifest["vocab"]["sha256"]
    if sha256 and sha256 != recorded:
        raise DatasetError(f"pinned vocabulary {storage.join(uri, VOCAB_FILE)}: sha256 {recorded}, expected {sha256}")
    return ds.vocab, ds.manifest


def is_complete(uri: str) -> bool:
    return storage.exists(storage.join(uri, MANIFEST))


# Local files this process hashed: path -> (size, mtime, inode, sha256). A file whose stat is
# unchanged is not hashed again (verify_dataset then training or evaluation in one process).
_verified: dict[str, tuple[int, int, int, str]] = {}


def verified_buffer(url: str, sha256: str | None) -> pa.Buffer:
    """A file's bytes (memory-mapped when local), checked against its sha256 (when given)."""
    local = storage.is_local(url)
    try:
        if local:
            path = storage.local_path(url)
            st = os.stat(path)
            buffer = pa.memory_map(path).read_buffer()
        else:
            buffer = pa.py_buffer(storage.read_bytes(url))
    except FileNotFoundError:
        raise DatasetError(f"missing file {url}") from None
    if not sha256:
        return buffer
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino, sha256) if local else None
    if stamp is not None and _verified.get(path) == stamp:
        return buffer
    actual = storage.sha256_bytes(memoryview(buffer))
    if actual != sha256:
        raise DatasetError(f"corrupt file {url}: sha256 {actual}, expected {sha256}")
    if stamp is not None:
        _verified[path] = stamp
    return buffer


def _read_verified(url: str, sha256: str | None, what: str = "file") -> pa.Table:
    """Read a Parquet file (memory-mapped when local), check its sha256 (when given), parse it."""
    buffer = verified_buffer(url, sha256)
    try:
        return pq.read_table(pa.BufferReader(buffer))
    except (pa.ArrowException, OSError) as e:  # a damaged footer is an OSError ("Couldn't deserialize thrift")
        raise DatasetError(f"corrupt {what} {url}: {e}") from None
