"""Token counts and the d2l vocabulary.

Counting streams: each chunk is counted on its own (``count_chunk`` in
``pipeline.data.prepare``) and the counts are merged in chunk order. Counts keep
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
    def build(cls, counts: TokenCounts, cfg: VocabConfig = VocabConfig()) -> "Vocab":
        tokens = [UNK, *(t for t in cfg.reserved_tokens if t != UNK)]
        seen = set(tokens)
        by_freq = sorted(counts.items(), key=lambda item: -item[1])  # stable: ties keep first occurrence
        for token, n in by_freq:
            if n < cfg.min_freq or (cfg.max_size is not None and len(tokens) >= cfg.max_size):
                break
            if token not in seen:
                tokens.append(token)
                seen.add(token)
        return cls.recount(tokens, counts)

    @classmethod
    def recount(cls, tokens: Sequence[str], counts: TokenCounts) -> "Vocab":
        """The vocabulary ``tokens`` as it is, with each token's count in ``counts`` (``<unk>``'s: all the others)."""
        index = set(tokens)
        kept_counts = [counts.get(t, 0) for t in tokens]
        kept_counts[0] = sum(n for t, n in counts.items() if t not in index) + counts.get(UNK, 0)
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
