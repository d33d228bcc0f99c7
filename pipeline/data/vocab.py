"""Token counts and the d2l vocabulary.

Counting streams: each chunk is counted on its own (``count_chunk`` in
``pipeline.data.prepare``) and the counts are merged in chunk order, into an Arrow
table (``merge_count_tables``: a few dozen bytes a distinct type, where a Python dict
takes several times that; a corpus can have millions of types). Counts keep
first-occurrence order, which is what breaks frequency ties, exactly as
``collections.Counter`` + a stable sort does in d2l.

Vocabulary layout (d2l's ``Vocab``): ``<unk>`` at index 0, then the reserved
tokens, then every other token by descending frequency (ties: first seen
first), dropping tokens rarer than ``min_freq`` and cutting at ``max_size``
entries in all. Unknown tokens map to 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import VocabConfig
from pipeline.data.tokenizer import UNK

TokenCounts = dict[str, int]  # insertion order = first occurrence


def count_values(tokens: pa.Array) -> TokenCounts:
    """Counts of an array of tokens (strings or code points), in first-occurrence order."""
    counted = pc.value_counts(tokens)
    values = counted.field(0).to_pylist()
    if pa.types.is_integer(tokens.type):
        values = [chr(v) for v in values]
    return dict(zip(values, counted.field(1).to_pylist()))


def count_table(tokens: pa.Array) -> pa.Table:
    """``count_values`` of string tokens as a table (token, count), in first-occurrence order:
    no Python object per distinct token (a chunk of a corpus with millions of types)."""
    counted = pc.value_counts(tokens)
    return pa.table([counted.field(0).cast(pa.string()), counted.field(1).cast(pa.int64())], names=["token", "count"])


def total_count(counts: TokenCounts | pa.Table) -> int:
    """How many tokens ``counts`` counts."""
    return (pc.sum(counts["count"]).as_py() or 0) if isinstance(counts, pa.Table) else sum(counts.values())


def count_codes(codes: np.ndarray) -> TokenCounts:
    """Counts of code points (char level), in first-occurrence order.

    ASCII text (uint8 codes) takes a fast path: a histogram in 1 MiB blocks (so
    bincount's index conversion stays small) and, for the few distinct bytes, the
    position of each one's first occurrence.
    """
    if codes.dtype != np.uint8:
        return count_values(pa.array(codes))
    hist = np.zeros(256, dtype=np.int64)
    for i in range(0, codes.size, 1 << 20):
        hist += np.bincount(codes[i : i + (1 << 20)], minlength=256)
    data = codes.tobytes()
    present = sorted(np.flatnonzero(hist).tolist(), key=lambda b: data.find(bytes((b,))))
    return {chr(b): int(hist[b]) for b in present}


def merge_counts(parts: Iterable[TokenCounts]) -> TokenCounts:
    """Sum counts of consecutive chunks; first-occurrence order carries over."""
    total: TokenCounts = {}
    for part in parts:
        for token, n in part.items():
            total[token] = total.get(token, 0) + n
    return total


COUNT_SCHEMA = pa.schema([("token", pa.string()), ("count", pa.int64()), ("first", pa.int64())])


def counts_table(counts: TokenCounts | pa.Table, chunk: int = 0) -> pa.Table:
    """``counts`` (a dict, or a ``count_table``) as a table of (token, count, first): ``first``
    orders first occurrences across chunks (chunk index, then the order within the chunk)."""
    first = pa.array(np.arange(len(counts), dtype=np.int64) + (np.int64(chunk) << 32))
    if isinstance(counts, pa.Table):
        return pa.table([counts["token"], counts["count"], first], schema=COUNT_SCHEMA)
    return pa.table([pa.array(list(counts), pa.string()), pa.array(list(counts.values()), pa.int64()), first],
                    schema=COUNT_SCHEMA)


def merge_count_tables(parts: Iterable[TokenCounts | pa.Table]) -> pa.Table:
    """``merge_counts`` into a ``counts_table`` (in first-occurrence order), for very many types.

    Chunks' tables wait until they hold as many rows as the merged table, then are summed
    into it with one Arrow group-by: every row is merged O(log chunks) times, and memory
    stays a small multiple of the distinct types' Arrow size.
    """
    merged = pa.Table.from_batches([], schema=COUNT_SCHEMA)
    pending: list[pa.Table] = []
    pending_rows = 0
    for i, part in enumerate(parts):
        pending.append(counts_table(part, i))
        pending_rows += len(part)
        if pending_rows >= max(len(merged), 1 << 16):
            merged, pending, pending_rows = _sum_counts([merged, *pending]), [], 0
    merged = _sum_counts([merged, *pending])
    return merged.take(pc.sort_indices(merged, sort_keys=[("first", "ascending")]))


def _sum_counts(tables: list[pa.Table]) -> pa.Table:
    summed = pa.concat_tables(tables).group_by("token", use_threads=False).aggregate(
        [("count", "sum"), ("first", "min")])
    return summed.rename_columns({"count_sum": "count", "first_min": "first"}).select(["token", "count", "first"])


def _as_table(counts: TokenCounts | pa.Table) -> pa.Table:
    return counts if isinstance(counts, pa.Table) else counts_table(counts)


@dataclass(frozen=True)
class Vocab:
    """Index <-> token, with each token's corpus count (``<unk>``'s counts what it absorbed)."""

    tokens: tuple[str, ...]
    counts: tuple[int, ...] = field(default=())

    def __post_init__(self):
        if not self.tokens or self.tokens[0] != UNK:
            raise ValueError(f"a vocabulary starts with {UNK!r}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")

    @classmethod
    def build(cls, counts: TokenCounts | pa.Table, cfg: VocabConfig = VocabConfig()) -> "Vocab":
        """From token counts (a dict in first-occurrence order, or a ``counts_table``)."""
        table = _as_table(counts)
        tokens = [UNK, *(t for t in cfg.reserved_tokens if t != UNK)]
        seen = set(tokens)
        frequent = table.filter(pc.greater_equal(table["count"], cfg.min_freq))
        # By frequency, ties by first occurrence; no more candidates than can be kept (a
        # reserved token met again is skipped, hence the extra len(tokens)).
        order = pc.sort_indices(frequent, sort_keys=[("count", "descending"), ("first", "ascending")])
        if cfg.max_size is not None:
            order = order[: cfg.max_size + len(tokens)]
        for token in frequent["token"].take(order).to_pylist():
            if cfg.max_size is not None and len(tokens) >= cfg.max_size:
                break
            if token not in seen:
                tokens.append(token)
                seen.add(token)
        return cls.recount(tokens, table)

    @classmethod
    def recount(cls, tokens: Sequence[str], counts: TokenCounts | pa.Table) -> "Vocab":
        """The vocabulary ``tokens`` as it is, with each token's count in ``counts`` (``<unk>``'s: all the others)."""
        table = _as_table(counts)
        kept = table.filter(pc.is_in(table["token"], value_set=pa.array(list(tokens), pa.string())))
        found = dict(zip(kept["token"].to_pylist(), kept["count"].to_pylist()))
        kept_counts = [found.get(t, 0) for t in tokens]
        total = pc.sum(table["count"]).as_py() or 0
        kept_counts[0] = total - sum(kept_counts[1:])  # everything else, and <unk>'s own
        return cls(tuple(tokens), tuple(kept_counts))

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.tokens).encode("utf-8")).hexdigest()

    @cached_property
    def id_dtype(self) -> np.dtype:
        """The narrowest unsigned integer type that holds every index."""
        for dtype in (np.uint8, np.uint16, np.uint32):
            if len(self) - 1 <= np.iinfo(dtype).max:
                return np.dtype(dtype)
        raise ValueError(f"vocabulary of {len(self)} tokens is too large")

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.index.get(t, 0) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    # ---------------------------------------------------------------- bulk encoding

    @cached_property
    def _code_lut(self) -> np.ndarray:
        """Code point -> index, for single-character tokens (char level)."""
        chars = [(ord(t), i) for i, t in enumerate(self.tokens) if len(t) == 1]
        lut = np.zeros(max((c for c, _ in chars), default=0) + 1, dtype=self.id_dtype)
        for code, i in chars:
            lut[code] = i
        return lut

    @cached_property
    def _token_array(self) -> pa.Array:
        return pa.array(self.tokens, pa.string())

    @cached_property
    def _byte_table(self) -> bytes:
        """``_code_lut`` as a 256-byte translation table (ids of code points 0..255)."""
        return np.pad(self._code_lut[:256], (0, max(256 - self._code_lut.size, 0))).astype(np.uint8).tobytes()

    def encode_codes(self, codes: np.ndarray) -> np.ndarray:
        """Code points -> indices (unknown characters -> 0)."""
        if codes.dtype == np.uint8 and self.id_dtype == np.uint8:  # ASCII text, <= 256 tokens: C's bytes.translate
            return np.frombuffer(codes.tobytes().translate(self._byte_table), dtype=np.uint8)
        lut = self._code_lut
        if codes.size and codes.max() >= lut.size:
            codes = np.where(codes < lut.size, codes, 0)
        return lut[codes]

    def encode_words(self, words: pa.Array) -> np.ndarray:
        """An array of word tokens -> indices (unknown words -> 0)."""
        ids = pc.fill_null(pc.index_in(words, value_set=self._token_array), 0)
        return ids.to_numpy(zero_copy_only=False).astype(self.id_dtype)

    # ---------------------------------------------------------------- persistence

    def to_table(self) -> pa.Table:
        return pa.table(
            {
                "index": pa.array(range(len(self)), pa.uint32()),
                "token": pa.array(self.tokens, pa.string()),
                "count": pa.array(self.counts or [0] * len(self), pa.int64()),
            }
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> "Vocab":
        index = table.column("index").to_pylist()
        if index != list(range(len(index))):
            raise ValueError("vocabulary index column is not 0..n-1 in order")
        return cls(tuple(table.column("token").to_pylist()), tuple(table.column("count").to_pylist()))
