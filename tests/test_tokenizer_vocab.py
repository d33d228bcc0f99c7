"""Tokenizer and vocabulary: the d2l numbers, equivalence with d2l's own code, and the edge cases."""

from __future__ import annotations

import collections
import io
import random
import re
from importlib import resources

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import ConfigError, DataConfig, SourceConfig, TokenizerConfig, VocabConfig, parse_config
from pipeline.data.prepare import prepare_dataset
from pipeline.data.tokenizer import EOS, char_codes, normalize, tokenize, word_tokens
from pipeline.data.vocab import UNK, Vocab, count_values, merge_counts

CHAR = TokenizerConfig(level="char")  # d2l: normalizer d2l, newlines drop
WORD = TokenizerConfig(level="word")


# ------------------------------------------------------------------ d2l reference


def d2l_lines(data: bytes) -> list[str]:
    """d2l's ``read_time_machine``, literally: open() in text mode (universal newlines), readlines()."""
    lines = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8").readlines()
    return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines]


def d2l_tokenize(lines: list[str], token: str) -> list[list[str]]:
    return [line.split() for line in lines] if token == "word" else [list(line) for line in lines]


class D2LVocab:
    """d2l's ``Vocab`` (ch. 8.2), literally."""

    def __init__(self, tokens, min_freq=0, reserved_tokens=()):
        counter = collections.Counter(tokens)
        self.token_freqs = sorted(counter.items(), key=lambda x: x[1], reverse=True)
        self.idx_to_token = ["<unk>"] + list(reserved_tokens)
        self.token_to_idx = {t: i for i, t in enumerate(self.idx_to_token)}
        for token, freq in self.token_freqs:
            if freq < min_freq:
                break
            if token not in self.token_to_idx:
                self.idx_to_token.append(token)
                self.token_to_idx[token] = len(self.idx_to_token) - 1


def vocab_of(tokens, **cfg) -> Vocab:
    return Vocab.build(collections.Counter(tokens), VocabConfig(**cfg))


# ------------------------------------------------------------------- d2l numbers


def test_d2l_char_numbers(timemachine_text):
    tokens = tokenize(timemachine_text, CHAR)
    vocab = vocab_of(tokens)
    assert len(tokens) == 170_580
    assert len(vocab) == 28
    assert vocab.tokens[0] == UNK and set(vocab.tokens[1:]) == set(" abcdefghijklmnopqrstuvwxyz")
    assert vocab.tokens[:5] == (UNK, " ", "e", "t", "a")
    assert vocab.encode(tokens[:10]) == [3, 9, 2, 1, 3, 5, 13, 2, 1, 13]
    assert "".join(tokens[:10]) == "the time m"


def test_d2l_word_numbers(timemachine_text):
    tokens = tokenize(timemachine_text, WORD)
    vocab = vocab_of(tokens)
    assert len(tokens) == 32_775
    assert len(vocab) == 4_580
    assert tokens[:5] == ["the", "time", "machine", "by", "h"]
    assert vocab.tokens[:6] == (UNK, "the", "i", "and", "of", "a")


def test_normalizer_matches_d2l_on_the_bundled_text(timemachine_text):
    data = timemachine_text.encode()
    lines = d2l_lines(data)
    for level in ("char", "word"):
        cfg = TokenizerConfig(level=level)
        expected = [t for line in d2l_tokenize(lines, level) for t in line]
        assert tokenize(timemachine_text, cfg) == expected
    ref_vocab = D2LVocab([t for line in d2l_tokenize(lines, "word") for t in line], min_freq=3, reserved_tokens=["<pad>", "<bos>"])
    ours = vocab_of(tokenize(timemachine_text, WORD), min_freq=3, reserved_tokens=("<pad>", "<bos>"))
    assert list(ours.tokens) == ref_vocab.idx_to_token
    assert len(ours) < 4_580  # min_freq cut something


TRICKY = list("abcXYZ  \t\t,.!?'-_0123;:\"") + [
    "\n", "\n", "\r\n", "\r\n", "\r", "\n\n", "\t\n", " \n",
    "\u00e9", "\u00c9", "\u00df", "\u0130", "\u212a", "\u4e2d\u6587", "\U0001f600", "\u00a0", "\u2028", "\u3000",
    "\x0b", "\x0c", "\x1c", "\x85", "\ufeff", "Hello", "WORLD", "don't",
]


def fuzz_cases(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    cases = [b"", b"\n", b"\r\n\r\n", "\ufeffA BOM-led line\r\n".encode(), b"no newline at end", b"\n\n  lead and trail  \n\n"]
    for _ in range(n):
        cases.append("".join(rng.choice(TRICKY) for _ in range(rng.randint(1, 80))).encode())
    return cases


def check_against_d2l(data: bytes) -> None:
    raw = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8").readlines()
    lines = d2l_lines(data)
    # normalize keeps one "\n" per line break
    expected = "".join(line + ("\n" if r.endswith("\n") else "") for line, r in zip(lines, raw))
    assert normalize(data, CHAR).decode() == expected
    text = data.decode()
    assert tokenize(text, CHAR) == [c for line in lines for c in line]
    assert tokenize(text, WORD) == [w for line in lines for w in line.split()]
    with_eos = [t for line in lines if line for t in (*line.split(), EOS)]
    assert tokenize(text, TokenizerConfig(level="word", eos=True)) == with_eos
    spaced = TokenizerConfig(level="char", newlines="space")
    assert "".join(tokenize(text, spaced)) == expected.replace("\n", " ")


@pytest.mark.parametrize("seed", range(4))
def test_normalizer_matches_d2l_fuzz(seed):
    for data in fuzz_cases(100, seed):
        try:
            check_against_d2l(data)
        except AssertionError as e:
            raise AssertionError(f"differs from d2l on {data!r}") from e


def test_normalizer_fuzz_is_not_vacuous():
    cases = [c for seed in range(4) for c in fuzz_cases(100, seed)]
    assert sum(b"\r" in c and b"\r\n" not in c for c in cases) > 5
    assert sum(len(d2l_lines(c)) > 3 for c in cases) > 100


# ------------------------------------------------------------ other normalizers


def test_lower_and_none_normalizers():
    text = "\ufeffCaf\u00c9 \u00dcber\r\nLine  Two\n"
    assert normalize(text.encode(), TokenizerConfig(normalizer="lower")).decode() == "caf\u00e9 \u00fcber\nline  two\n"
    assert normalize(text.encode(), TokenizerConfig(normalizer="none")).decode() == "Caf\u00c9 \u00dcber\nLine  Two\n"
    assert tokenize("Ab\r\nC", TokenizerConfig(normalizer="none")) == ["A", "b", "\n", "C"]  # newlines keep
    assert tokenize("Ab\nC", TokenizerConfig(normalizer="lower", newlines="drop")) == ["a", "b", "c"]
    assert tokenize("Ab, C!\nd", TokenizerConfig(level="word", normalizer="none")) == ["Ab,", "C!", "d"]


def test_newline_modes_for_d2l():
    text = "One, two.\nThree!\n\nFour"
    assert "".join(tokenize(text, TokenizerConfig(newlines="drop"))) == "one twothreefour"
    assert "".join(tokenize(text, TokenizerConfig(newlines="space"))) == "one two three  four"
    assert "".join(tokenize(text, TokenizerConfig(newlines="keep"))) == "one two\nthree\n\nfour"


def test_eos_after_every_non_empty_line():
    text = "  a b \n\n\t\nc\n   d  e\nf"
    cfg = TokenizerConfig(level="word", normalizer="none", eos=True)
    assert tokenize(text, cfg) == ["a", "b", EOS, "c", EOS, "d", "e", EOS, "f", EOS]
    assert tokenize("x\n", cfg) == ["x", EOS]
    assert tokenize("\n\n", cfg) == []
    # d2l normalizer: a line of punctuation is empty after normalization, so no <eos> for it
    assert tokenize("Hi!\n?!\nyo", TokenizerConfig(level="word", eos=True)) == ["hi", EOS, "yo", EOS]


def test_eos_needs_word_level():
    with pytest.raises(ConfigError, match="eos"):
        parse_config(TokenizerConfig, {"level": "char", "eos": True})


# ---------------------------------------------------------------------- vocabulary


def test_vocab_order_descending_frequency_ties_by_first_occurrence():
    tokens = "d b a c b a d b e".split()
    # counts: b 3, d 2, a 2, c 1, e 1 -- d was seen before a, c before e
    vocab = vocab_of(tokens)
    assert vocab.tokens == (UNK, "b", "d", "a", "c", "e")
    assert vocab.counts == (0, 3, 2, 2, 1, 1)
    assert list(vocab.tokens) == D2LVocab(tokens).idx_to_token


def test_counts_keep_first_occurrence_across_chunks():
    parts = [count_values(pa.array(chunk.split())) for chunk in ("x y", "z z y", "w x")]
    assert [list(p.items()) for p in parts] == [[("x", 1), ("y", 1)], [("z", 2), ("y", 1)], [("w", 1), ("x", 1)]]
    counts = merge_counts(parts)
    assert list(counts.items()) == [("x", 2), ("y", 2), ("z", 2), ("w", 1)]
    assert Vocab.build(counts).tokens == (UNK, "x", "y", "z", "w")
    codes = count_values(pa.array(np.array([ord("q"), ord("\u4e2d"), ord("q")], dtype=np.uint32)))
    assert list(codes.items()) == [("q", 2), ("\u4e2d", 1)]


def test_min_freq_max_size_and_reserved_tokens():
    tokens = "a a a a b b b c c d".split()
    assert vocab_of(tokens, min_freq=2).tokens == (UNK, "a", "b", "c")
    assert vocab_of(tokens, min_freq=2).counts == (1, 4, 3, 2)  # <unk> absorbed the one "d"
    assert vocab_of(tokens, max_size=3).tokens == (UNK, "a", "b")
    assert vocab_of(tokens, max_size=3).counts == (3, 4, 3)
    v = vocab_of(tokens, reserved_tokens=("<pad>", "b", "<bos>"))
    assert v.tokens == (UNK, "<pad>", "b", "<bos>", "a", "c", "d")  # "b" is not listed twice
    assert v.counts == (0, 0, 3, 0, 4, 2, 1)
    assert vocab_of(tokens, max_size=4, reserved_tokens=("<pad>",)).tokens == (UNK, "<pad>", "a", "b")
    assert list(vocab_of(tokens, min_freq=3, reserved_tokens=("<pad>",)).tokens) == D2LVocab(tokens, 3, ["<pad>"]).idx_to_token


def test_unknown_tokens_map_to_unk():
    v = vocab_of("a b a".split())
    assert v.encode(["a", "zzz", "b", UNK]) == [1, 0, 2, 0]
    assert v.decode([1, 0, 2]) == ["a", UNK, "b"]
    ids = v.encode_words(pa.array(["b", "nope", "a"]))
    assert ids.tolist() == [2, 0, 1] and ids.dtype == np.uint8
    cv = vocab_of(list("ab"))
    assert cv.encode_codes(np.array([ord("b"), ord("x"), 0x4E2D, ord("a")], dtype=np.uint32)).tolist() == [2, 0, 0, 1]


def test_vocab_validation_and_dtype():
    with pytest.raises(ValueError, match="starts with"):
        Vocab(("a", UNK))
    with pytest.raises(ValueError, match="unique"):
        Vocab((UNK, "a", "a"))
    assert vocab_of([f"t{i}" for i in range(255)]).id_dtype == np.uint8  # 256 entries: ids 0..255
    assert vocab_of([f"t{i}" for i in range(256)]).id_dtype == np.uint16
    v = vocab_of("x y y".split())
    assert Vocab.from_table(v.to_table()) == v
    assert v.sha256 == vocab_of("y x y".split()).sha256 != vocab_of("x y x".split()).sha256


def test_bulk_encoders_match_encode(timemachine_text):
    data = timemachine_text.encode()
    words = word_tokens(data, TokenizerConfig(level="word", eos=True))
    vocab = vocab_of(words.to_pylist(), min_freq=5)
    assert vocab.encode_words(words).tolist() == vocab.encode(words.to_pylist())
    codes = char_codes(data, CHAR)
    cvocab = vocab_of([chr(c) for c in codes.tolist()], max_size=20)
    assert cvocab.encode_codes(codes).tolist() == cvocab.encode([chr(c) for c in codes.tolist()])
    assert (cvocab.encode_codes(codes) == 0).sum() == cvocab.counts[0] > 0


# --------------------------------------------------------------------- Chinese


LYRICS = "想要有直升机\n想要和你飞到宇宙去\n想要和你融化在一起\n融化在宇宙里\nI love you 我爱你, ok?\n"
CN = TokenizerConfig(level="char", normalizer="none", newlines="space")


def test_chinese_char_round_trip():
    tokens = tokenize(LYRICS, CN)
    assert tokens[:6] == list("想要有直升机") and tokens[6] == " "
    assert len(tokens) == len(LYRICS)
    vocab = vocab_of(tokens)
    ids = vocab.encode(tokens)
    assert 0 not in ids
    assert "".join(vocab.decode(ids)) == LYRICS.replace("\n", " ")
    assert vocab.tokens[:4] == (UNK, " ", "想", "要")  # space x9; 想 and 要 x3 each, 想 seen first
    codes = char_codes(LYRICS.encode(), CN)
    assert codes.dtype == np.uint32 and vocab.encode_codes(codes).tolist() == ids


def test_chinese_round_trip_through_prepare(tmp_path, store):
    path = tmp_path / "lyrics.txt"
    path.write_text(LYRICS * 40, encoding="utf-8")
    cfg = DataConfig(sources=(SourceConfig(url=str(path)),), tokenizer=CN, chunk_bytes=1024, tokens_per_shard=97)
    ds = prepare_dataset(cfg, store)
    ids = np.concatenate([ds.split(s) for s in ("train", "val", "test")])
    assert "".join(ds.vocab.decode(ids.tolist())) == (LYRICS * 40).replace("\n", " ")
    assert ds.num_tokens == len(LYRICS) * 40
