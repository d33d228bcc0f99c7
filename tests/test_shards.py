"""Prepared datasets: the d2l numbers end to end, shards, manifest, content addressing, corruption."""

from __future__ import annotations

import collections
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import TIMEMACHINE_SHA1, ConfigError, DataConfig, SourceConfig, TokenizerConfig, parse_config
from pipeline.data.corpus import fetch_corpus
from pipeline.errors import DatasetError
from pipeline.data.prepare import dataset_id, plan_chunks, prepare_dataset
from pipeline.data.shards import open_dataset
from pipeline.data.tokenizer import tokenize
from pipeline.data.vocab import UNK, Vocab

SPLITS = ("train", "val", "test")
D2L_FIRST_IDS = [3, 9, 2, 1, 3, 5, 13, 2, 1, 13]


def all_ids(ds) -> np.ndarray:
    return np.concatenate([ds.split(s) for s in SPLITS])


def files_in(ds) -> list[str]:
    return sorted(os.listdir(ds.uri))


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source(path) -> tuple[SourceConfig, ...]:
    return (SourceConfig(url=str(path)),)


# ------------------------------------------------------------------ d2l numbers


def test_d2l_char_dataset(store):
    ds = prepare_dataset(DataConfig(), store)  # the d2l preset: timemachine, char, d2l normalizer
    m = ds.manifest
    assert m["num_tokens"] == ds.num_tokens == 170_580
    assert m["vocab_size"] == len(ds.vocab) == 28
    assert sum(m["splits"][s]["num_tokens"] for s in SPLITS) == 170_580
    assert {s: m["splits"][s]["num_tokens"] for s in SPLITS} == {"train": 153_522, "val": 8_529, "test": 8_529}
    assert ds.split("train")[:10].tolist() == D2L_FIRST_IDS
    assert ds.vocab.tokens[:5] == (UNK, " ", "e", "t", "a")
    assert m["dtype"] == "uint8" and ds.split("val").dtype == np.uint8
    assert m["sources"][0]["sha1"] == TIMEMACHINE_SHA1


def test_d2l_word_dataset(store, timemachine_text):
    ds = prepare_dataset(DataConfig(tokenizer=TokenizerConfig(level="word")), store)
    assert ds.num_tokens == 32_775 and ds.vocab_size == 4_580
    assert sum(ds.manifest["splits"][s]["num_tokens"] for s in SPLITS) == 32_775
    assert ds.manifest["dtype"] == "uint16"
    ids = all_ids(ds)
    assert ds.vocab.decode(ids[:6].tolist()) == ["the", "time", "machine", "by", "h", "g"]
    assert ds.vocab.decode(ids.tolist()) == tokenize(timemachine_text, TokenizerConfig(level="word"))


# ----------------------------------------------------------- chunked == whole


@pytest.fixture
def tricky_corpus(tmp_path, timemachine_text) -> Path:
    """The bundled text plus CRLF, lone CR, blank lines and non-ASCII: ~180 KB."""
    extra = "Caf\u00e9 \u00fcber\r\nna\u00efve\rline\n\n\u4e2d\u6587 text \U0001f600\r\n   \n" * 200
    path = tmp_path / "tricky.txt"
    path.write_bytes((timemachine_text + extra).encode())
    return path


@pytest.mark.parametrize(
    "tokenizer",
    [
        TokenizerConfig(level="char"),
        TokenizerConfig(level="word", eos=True),
        TokenizerConfig(level="char", normalizer="none"),
        TokenizerConfig(level="word", normalizer="lower", eos=True),
    ],
    ids=["char-d2l", "word-d2l-eos", "char-none", "word-lower-eos"],
)
def test_chunked_equals_whole(tmp_path, tricky_corpus, tokenizer):
    small = DataConfig(sources=source(tricky_corpus), tokenizer=tokenizer, chunk_bytes=1024)
    whole = small.model_copy(update={"chunk_bytes": 64 * 2**20})
    docs = fetch_corpus(small.sources, str(tmp_path / "a"))
    assert len(plan_chunks(docs, small.chunk_bytes)) > 150
    assert len(plan_chunks(docs, whole.chunk_bytes)) == 1
    a = prepare_dataset(small, str(tmp_path / "a"))
    b = prepare_dataset(whole, str(tmp_path / "b"))
    assert a.vocab == b.vocab
    assert np.array_equal(all_ids(a), all_ids(b))
    tokens = tokenize(tricky_corpus.read_bytes().decode("utf-8"), tokenizer)
    assert a.num_tokens == len(tokens)
    assert a.vocab.decode(all_ids(a).tolist()) == tokens
    assert a.vocab == Vocab.build(collections.Counter(tokens))


# ------------------------------------------------------------ shards & manifest


def test_round_trip_many_shards_and_manifest(store, timemachine_text):
    cfg = DataConfig(tokens_per_shard=5_000)
    ds = prepare_dataset(cfg, store)
    m = ds.manifest
    tokens = tokenize(timemachine_text, cfg.tokenizer)
    assert np.array_equal(all_ids(ds), np.array(ds.vocab.encode(tokens), dtype=np.uint8))

    # manifest fields
    assert m["schema_version"] == 1
    assert m["dataset_id"] == Path(ds.uri).name and Path(ds.uri).parent == Path(store) / "datasets"
    [src] = m["sources"]
    assert src["source"] == "builtin://timemachine" and src["sha1"] == TIMEMACHINE_SHA1
    assert src["sha256"] == hashlib.sha256(timemachine_text.encode()).hexdigest()
    assert src["num_bytes"] == len(timemachine_text.encode())
    assert m["tokenizer"] == {"level": "char", "normalizer": "d2l", "newlines": "drop", "eos": False,
                             "eos_on_empty_lines": False}
    assert m["vocab_size"] == 28 and m["num_tokens"] == m["corpus_tokens"] == 170_580
    assert m["vocab"]["file"] == "vocab.parquet"
    assert m["vocab"]["sha256"] == sha256_file(Path(ds.uri) / "vocab.parquet")
    assert m["vocab"]["tokens_sha256"] == ds.vocab.sha256 == hashlib.sha256("\n".join(ds.vocab.tokens).encode()).hexdigest()

    # shards: many, contiguous names, hashes of the actual files, sizes that add up
    expected_files = ["manifest.json", "vocab.parquet"]
    for split in SPLITS:
        info = m["splits"][split]
        shards = info["shards"]
        assert [s["file"] for s in shards] == [f"{split}-{i:05d}.parquet" for i in range(len(shards))]
        assert all(s["num_tokens"] == 5_000 for s in shards[:-1]) and 0 < shards[-1]["num_tokens"] <= 5_000
        assert sum(s["num_tokens"] for s in shards) == info["num_tokens"] == len(ds.split(split))
        for s in shards:
            assert s["sha256"] == sha256_file(Path(ds.uri) / s["file"])
            assert pq.read_schema(Path(ds.uri) / s["file"]).field("ids").type == pa.uint8()
            assert (Path(ds.uri) / s["file"]).stat().st_size < 2 * s["num_tokens"] + 4096  # ~1 byte a token
        expected_files += [s["file"] for s in shards]
    assert len(m["splits"]["train"]["shards"]) == 31  # ceil(153522 / 5000)
    assert files_in(ds) == sorted(expected_files)  # nothing else: no temp files
    assert json.loads((Path(ds.uri) / "manifest.json").read_text()) == m

    # vocab.parquet
    table = pq.read_table(Path(ds.uri) / "vocab.parquet")
    assert table.schema.names == ["index", "token", "count"]
    assert [f.type for f in table.schema] == [pa.uint32(), pa.string(), pa.int64()]
    assert table.column("index").to_pylist() == list(range(28))
    assert tuple(table.column("token").to_pylist()) == ds.vocab.tokens
    counts = table.column("count").to_pylist()
    assert counts[0] == 0 and sum(counts) == 170_580
    assert counts[1] == tokens.count(" ")


def test_narrowest_dtype(tmp_path, store):
    # 255 distinct words + <unk> = 256 entries: ids fit uint8; one more word needs uint16
    for n, dtype in [(255, "uint8"), (256, "uint16")]:
        path = tmp_path / f"w{n}.txt"
        path.write_text("\n".join(f"w{i:04d}" for i in range(n)) + "\n")
        cfg = DataConfig(sources=source(path), tokenizer=TokenizerConfig(level="word", normalizer="none"), tokens_per_shard=64)
        ds = prepare_dataset(cfg, store)
        assert ds.vocab_size == n + 1 and ds.manifest["dtype"] == dtype
        for s in ds.manifest["splits"]["train"]["shards"]:
            assert pq.read_schema(Path(ds.uri) / s["file"]).field("ids").type == getattr(pa, dtype)()
        assert all_ids(ds).dtype == np.dtype(dtype)
        assert sorted(all_ids(ds).tolist()) == list(range(1, n + 1))


# ------------------------------------------------------------ content addressing


def test_same_inputs_same_dir_reused(tmp_path, store):
    path = tmp_path / "a.txt"
    path.write_text("The quick brown fox.\nJumps over the lazy dog.\n" * 50)
    cfg = DataConfig(sources=source(path))
    a = prepare_dataset(cfg, store)
    stamp = os.stat(Path(a.uri) / "manifest.json").st_mtime_ns
    b = prepare_dataset(cfg, store)
    assert a.uri == b.uri and a.manifest == b.manifest
    assert os.stat(Path(b.uri) / "manifest.json").st_mtime_ns == stamp  # reused, not rewritten
    # chunk_bytes and where the bytes came from are not part of the address
    c = prepare_dataset(cfg.model_copy(update={"chunk_bytes": 1024}), store)
    copy = tmp_path / "copy.txt"
    copy.write_bytes(path.read_bytes())
    d = prepare_dataset(DataConfig(sources=source(copy)), store)
    assert a.uri == c.uri == d.uri
    assert len(os.listdir(Path(store) / "datasets")) == 1

    # one byte of the text changed, or a setting changed -> a different dataset
    path.write_bytes(path.read_bytes().replace(b"lazy", b"hazy", 1))
    e = prepare_dataset(cfg, store)
    f = prepare_dataset(cfg.model_copy(update={"tokens_per_shard": 100}), store)
    g = prepare_dataset(DataConfig(sources=source(copy), tokenizer=TokenizerConfig(level="word")), store)
    assert len({a.uri, e.uri, f.uri, g.uri}) == 4
    assert len(os.listdir(Path(store) / "datasets")) == 4
    assert e.manifest["sources"][0]["sha256"] != a.manifest["sources"][0]["sha256"]
    assert dataset_id(fetch_corpus(cfg.sources, store), cfg) == e.dataset_id


# ------------------------------------------------------------------- corruption


@pytest.fixture
def prepared(store):
    return prepare_dataset(DataConfig(tokens_per_shard=20_000), store)


def test_flipped_byte_in_a_shard(prepared):
    name = prepared.manifest["splits"]["train"]["shards"][2]["file"]
    path = Path(prepared.uri) / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    fresh = open_dataset(prepared.uri)
    assert len(fresh.split("val")) == 8_529  # other files still read
    with pytest.raises(DatasetError, match=f"corrupt file .*{name}.*sha256"):
        fresh.split("train")


def test_deleted_shard(prepared):
    name = prepared.manifest["splits"]["test"]["shards"][0]["file"]
    (Path(prepared.uri) / name).unlink()
    with pytest.raises(DatasetError, match=f"missing file .*{name}"):
        open_dataset(prepared.uri).split("test")


def test_corrupt_vocab_file(prepared):
    path = Path(prepared.uri) / "vocab.parquet"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DatasetError, match="vocab.parquet"):
        _ = open_dataset(prepared.uri).vocab


def test_missing_or_corrupt_manifest(prepared, tmp_path):
    with pytest.raises(DatasetError, match="manifest.json is missing"):
        open_dataset(str(tmp_path))  # a directory without a manifest
    (Path(prepared.uri) / "manifest.json").write_text('{"schema_version": 1, "spl')
    with pytest.raises(DatasetError, match="corrupt manifest"):
        open_dataset(prepared.uri)
    (Path(prepared.uri) / "manifest.json").write_text('{"schema_version": 99}')
    with pytest.raises(DatasetError, match="schema_version 99"):
        open_dataset(prepared.uri)


def test_unknown_split(prepared):
    with pytest.raises(DatasetError, match="no split 'dev'"):
        prepared.split("dev")


# ------------------------------------------------------------- cap and splits


def test_max_tokens_cap(store):
    full = prepare_dataset(DataConfig(), store)
    capped = prepare_dataset(DataConfig.model_validate({"splits": {"max_tokens": 1_000}, "tokens_per_shard": 300}), store)
    assert capped.num_tokens == 1_000 and capped.manifest["corpus_tokens"] == 170_580
    assert {s: len(capped.split(s)) for s in SPLITS} == {"train": 900, "val": 50, "test": 50}
    assert np.array_equal(all_ids(capped), all_ids(full)[:1_000])
    assert capped.vocab == full.vocab  # the vocabulary still comes from the whole corpus


def test_split_fractions_are_contiguous(store):
    full = all_ids(prepare_dataset(DataConfig(), store))
    ds = prepare_dataset(DataConfig.model_validate({"splits": {"train": 0.7, "val": 0.2, "test": 0.1}}), store)
    sizes = {s: len(ds.split(s)) for s in SPLITS}
    assert sizes == {"train": 170_580 - 34_116 - 17_058, "val": 34_116, "test": 17_058}
    assert np.array_equal(all_ids(ds), full)
    assert np.array_equal(ds.split("val"), full[sizes["train"] : sizes["train"] + sizes["val"]])
    only_train = prepare_dataset(DataConfig.model_validate({"splits": {"train": 1.0, "val": 0, "test": 0}}), store)
    assert len(only_train.split("train")) == 170_580
    assert only_train.manifest["splits"]["val"] == {"num_tokens": 0, "shards": []}
    assert only_train.split("test").size == 0 and only_train.split("test").dtype == np.uint8


# --------------------------------------------------------------- config errors


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"tokenizer\.levle") as info:
        parse_config(DataConfig, {"tokenizer": {"levle": "word"}}, source="my.yaml")
    assert "my.yaml" in str(info.value)
    with pytest.raises(ConfigError, match="chunk_size"):
        parse_config(DataConfig, {"chunk_size": 4096})


def test_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match="sum to 1, got 1.1"):
        parse_config(DataConfig, {"splits": {"train": 0.9, "val": 0.1, "test": 0.1}})
    with pytest.raises(ConfigError, match="splits"):
        parse_config(DataConfig, {"splits": {"train": 0.5, "val": 0.1, "test": 0.1}})
    with pytest.raises(ConfigError, match="chunk_bytes"):
        parse_config(DataConfig, {"chunk_bytes": 10})
    with pytest.raises(ConfigError, match="sources"):
        parse_config(DataConfig, {"sources": []})
