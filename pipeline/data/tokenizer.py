"""Text -> tokens, vectorised with numpy and pyarrow.compute.

Two steps, on UTF-8 bytes that hold whole lines:

1. **normalize** to bytes that still separate lines with ``\\n``:
   ``d2l`` reproduces the book's ``re.sub('[^A-Za-z]+', ' ', line).strip().lower()``
   line by line (done on bytes: every byte of a non-ASCII character is a
   non-letter, exactly as the regex sees it); ``lower`` lowercases Unicode;
   ``none`` keeps the text as it is. A leading BOM goes.

   **One rule for line endings**, whatever the normalizer: ``\\n``, ``\\r\\n`` and a lone
   ``\\r`` are each one line break (Python's universal newlines, which is how d2l's
   ``open()`` reads the book); they all become ``\\n`` before anything else.
2. **split** into tokens. ``char``: one token per Unicode character, with line
   breaks dropped (d2l concatenates its lines), turned into spaces, or kept.
   ``word``: whitespace-separated words, plus ``<eos>`` after every non-empty
   line when asked (the PTB convention), or after every line (WikiText's).

Chunk boundaries fall on line boundaries, or inside an over-long line at a
``safe_cut`` (where cutting changes no token), so tokenizing a corpus chunk by chunk
gives exactly the tokens of tokenizing it whole. A chunk that ends inside a line is
tokenized with ``continues=True``: its last line gets no ``<eos>``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import TokenizerConfig

EOS = "<eos>"
UNK = "<unk>"  # index 0 of every vocabulary; unknown tokens map to it
NEWLINE = 0x0A

# d2l's per-byte map: letters lowercase, newlines stay, every other byte becomes a space.
# A lone \r is a line break too: d2l reads with open()'s universal newlines (\n, \r\n, \r).
SPACE = ord(" ")
_D2L_TABLE = bytes(
    c | 0x20 if chr(c).isascii() and chr(c).isalpha() else NEWLINE if c in (NEWLINE, 0x0D) else ord(" ") for c in range(256)
)


def normalize(data: bytes, cfg: TokenizerConfig) -> bytes:
    """Normalize whole lines of UTF-8 text; the result keeps ``\\n`` between lines."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if cfg.normalizer == "d2l":
        return _normalize_d2l(data)
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if cfg.normalizer == "lower":
        data = _string_data(pc.utf8_lower(_lines_array(data)))
    return data


def _d2l_bytes(data: bytes) -> bytearray:
    """The d2l byte map: lowercase letters, spaces and newlines (not yet collapsed or stripped)."""
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")  # one line break, not two (the table maps a lone \r to \n)
    return bytearray(data.translate(_D2L_TABLE))


def _normalize_d2l(data: bytes, drop_newlines: bool = False) -> bytes:
    """Per line: runs of non-letters -> one space, strip, lowercase.

    After the byte map only letters, spaces and newlines are left. Nothing
    changes at a single non-letter between two letters (a word gap or a line
    break), which is nearly every one, so only runs of two or more non-letters
    (and the two edges) are looked at: a run that holds a newline keeps just its
    newlines, a run of spaces between two letters becomes one space, a run at an
    edge goes. Removed bytes are zeroed, then C deletes the zeros (NUL is never
    in a corpus: fetching rejects it as binary data).
    """
    buf = _d2l_bytes(data)
    x = np.frombuffer(buf, dtype=np.uint8)
    n = x.size
    if n == 0:
        return b""
    gap = x <= SPACE
    pairs = np.flatnonzero(gap[:-1] & gap[1:])  # i where x[i] and x[i+1] are both non-letters
    if pairs.size:
        new_run = np.empty(pairs.size, dtype=bool)
        new_run[0] = True
        np.not_equal(pairs[1:], pairs[:-1] + 1, out=new_run[1:])
        first = pairs[new_run]  # each run of >= 2 non-letters is x[first : last + 1]
        last = pairs[np.append(new_run[1:], True)] + 1
        lengths = last - first + 1
        begin = np.cumsum(lengths) - lengths
        pos = np.arange(int(lengths.sum())) + np.repeat(first - begin, lengths)
        values = x[pos]
        has_newline = np.logical_or.reduceat(values == NEWLINE, begin)
        remove = values == SPACE
        remove[begin[~has_newline & (first > 0) & (last < n - 1)]] = False
        x[pos[remove]] = 0
    if x[0] == SPACE:
        x[0] = 0
    if x[-1] == SPACE:
        x[-1] = 0
    return bytes(buf.translate(None, b"\0\n" if drop_newlines else b"\0"))


def char_codes(data: bytes, cfg: TokenizerConfig) -> np.ndarray:
    """Unicode code points of the char-level token stream (uint8 when all ASCII)."""
    if cfg.normalizer == "d2l" and cfg.newlines == "drop":
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        return np.frombuffer(_normalize_d2l(data, drop_newlines=True), dtype=np.uint8)  # d2l output is ASCII
    text = normalize(data, cfg)
    if cfg.newlines == "drop":
        text = text.replace(b"\n", b"")
    elif cfg.newlines == "space":
        text = text.replace(b"\n", b" ")
    if text.isascii():
        return np.frombuffer(text, dtype=np.uint8)
    return np.frombuffer(text.decode("utf-8").encode("utf-32-le"), dtype=np.uint32)


def word_tokens(data: bytes, cfg: TokenizerConfig, continues: bool = False) -> pa.StringArray:
    """Whitespace-separated words of the normalized text, ``<eos>`` after each (non-empty) line if asked.

    ``continues``: ``data`` was cut inside its last line (at a ``safe_cut``), whose rest
    and ``<eos>`` come with the next piece.
    """
    # Trimmed first: the split yields an empty word at each edge of a line, and one for an empty line.
    if cfg.normalizer == "d2l":
        # Only ASCII letters, spaces and newlines: the byte map is enough, as the split
        # collapses runs of spaces and the trim strips the lines.
        lines = pc.ascii_trim_whitespace(_lines_array(bytes(_d2l_bytes(data))))
        words = pc.ascii_split_whitespace(lines)
    else:
        lines = pc.utf8_trim_whitespace(_lines_array(normalize(data, cfg)))
        words = pc.utf8_split_whitespace(lines)
    flat = words.flatten()
    empty_line = pc.equal(pc.binary_length(lines), 0)
    if pc.any(empty_line).as_py():
        flat = flat.filter(pc.not_equal(pc.binary_length(flat), 0))
    if not cfg.eos:
        return flat
    # Interleave: after the last word of each non-empty line, take the extra <eos> element.
    lengths = pc.list_value_length(words).to_numpy(zero_copy_only=False).copy()
    lengths[empty_line.to_numpy(zero_copy_only=False)] = 0
    ends_line = np.ones(len(lengths), dtype=bool) if cfg.eos_on_empty_lines else lengths > 0
    if continues and ends_line.size and not data.endswith(b"\n"):
        ends_line[-1] = False
    line_ends = np.cumsum(lengths)[ends_line]
    order = np.insert(np.arange(len(flat)), line_ends, len(flat))
    return pa.concat_arrays([flat, pa.array([EOS], pa.string())]).take(pa.array(order))


_LETTER = np.array([chr(c).isascii() and chr(c).isalpha() for c in range(256)])
_UTF8_TAIL = np.array([0x80 <= c < 0xC0 for c in range(256)])  # a byte inside a multi-byte character


def safe_cuts(data: bytes, before: int, cfg: TokenizerConfig) -> np.ndarray:
    """Offsets ``i`` in ``data`` (a piece of one line; ``before`` is the byte ahead of it)
    where the line can be cut ahead of ``data[i]`` and the two pieces, tokenized apart
    (the first with ``continues=True``), give exactly the tokens of the whole line.

    * word level: a space or tab, then an ASCII letter. No word is split, every
      normalizer sees a word gap there, and the piece after it holds a word, so the
      line's ``<eos>`` (after non-empty lines) still comes once, at its end.
    * char level, ``d2l``: between two ASCII letters, so no run of non-letters (which
      d2l collapses to one space, and strips at line edges) is cut.
    * char level, ``none`` / ``lower``: any character boundary but a BOM's and the one
      inside ``\\r\\n`` (one line break, not two).
    """
    b = np.frombuffer(data, dtype=np.uint8)
    prev = np.empty_like(b)
    if b.size:
        prev[0] = before
        prev[1:] = b[:-1]
    if cfg.level == "word":
        ok = ((prev == SPACE) | (prev == 0x09)) & _LETTER[b]
    elif cfg.normalizer == "d2l":
        ok = _LETTER[prev] & _LETTER[b]
    else:
        ok = ~_UTF8_TAIL[b] & (b != 0xEF) & ~((prev == 0x0D) & (b == NEWLINE))
    return np.flatnonzero(ok)


def tokenize(text: str, cfg: TokenizerConfig) -> list[str]:
    """The tokens of a (small) text: for prefixes, tests and inspection."""
    data = text.encode("utf-8")
    if cfg.level == "char":
        return [chr(c) for c in char_codes(data, cfg).tolist()]
    return word_tokens(data, cfg).to_pylist()


def _lines_array(data: bytes) -> pa.StringArray:
    """A zero-copy array of the lines of ``data``; each keeps its trailing ``\\n``."""
    b = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(b == NEWLINE) + 1
    if b.size and b[-1] != NEWLINE:
        ends = np.append(ends, b.size)
    offsets = np.concatenate(([0], ends)).astype(np.int32 if b.size < 2**31 else np.int64)
    kind = pa.string() if offsets.dtype == np.int32 else pa.large_string()
    return pa.Array.from_buffers(kind, len(offsets) - 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _string_data(arr: pa.Array) -> bytes:
    """The concatenated values of a string array (the text again, lines and all)."""
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32 if arr.type == pa.string() else np.int64)
    start, end = offsets[arr.offset], offsets[arr.offset + len(arr)]
    return arr.buffers()[2].to_pybytes()[start:end]
