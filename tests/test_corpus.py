"""Fetching corpora: every kind of source, every error, and a store with nothing half-written.

Real filesystems only: local files, fsspec ``memory://``, zip archives made here, and a
real HTTP server on 127.0.0.1 (``http_dir`` in conftest).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading
import uuid
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest

from pipeline.config import TIMEMACHINE_SHA1, DataConfig, SourceConfig, TokenizerConfig
from pipeline.data.corpus import READ_BLOCK, fetch_corpus, fetch_source
from pipeline.errors import CorpusError, SourceUnreachableError
from pipeline.data.prepare import CountedVocab, plan_chunks, prepare_dataset, write_dataset
from pipeline.data.vocab import Vocab

TEXT = b"The Time Machine, by H. G. Wells\nI.\n\nThe Time Traveller was expounding\n"


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def corpus_files(root: str) -> list[str]:
    d = Path(root) / "corpus"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def assert_clean_store(root: str) -> None:
    """No temp file in <root>/corpus (only <sha256>.txt), no dataset dir without a manifest."""
    for name in corpus_files(root):
        stem, dot, ext = name.partition(".")
        assert len(stem) == 64 and ext == "txt" and all(c in "0123456789abcdef" for c in stem), name
    datasets = Path(root) / "datasets"
    if datasets.exists():
        for entry in datasets.iterdir():
            assert (entry / "manifest.json").is_file(), f"incomplete dataset entry {entry.name}"


def fetch_error(url: str, root: str, **checksums) -> CorpusError:
    with pytest.raises(CorpusError) as info:
        fetch_source(SourceConfig(url=url, **checksums), root)
    assert info.value.source in str(info.value)
    assert_clean_store(root)
    return info.value


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


# ------------------------------------------------------------------------ sources


def check_document(doc, data: bytes, source: str, root: str) -> None:
    assert doc.source == source
    assert doc.sha1 == hashlib.sha1(data).hexdigest()
    assert doc.sha256 == hashlib.sha256(data).hexdigest()
    assert doc.num_bytes == len(data)
    assert Path(doc.uri) == Path(root) / "corpus" / f"{doc.sha256}.txt"
    assert Path(doc.uri).read_bytes() == data


def test_plain_path(tmp_path, store):
    path = write(tmp_path / "a.txt", TEXT)
    [doc] = fetch_source(SourceConfig(url=str(path)), store)
    check_document(doc, TEXT, str(path), store)
    assert corpus_files(store) == [f"{doc.sha256}.txt"]


def test_file_url_and_refetch_reuses_the_stored_copy(tmp_path, store):
    path = write(tmp_path / "a.txt", TEXT)
    [a] = fetch_source(SourceConfig(url=str(path)), store)
    [b] = fetch_source(SourceConfig(url=f"file://{path}"), store)
    check_document(b, TEXT, f"file://{path}", store)
    assert a.uri == b.uri
    assert corpus_files(store) == [f"{a.sha256}.txt"]  # content-addressed: one copy


def test_memory_url(store):
    url = f"memory://corpus-{uuid.uuid4().hex}/m.txt"
    data = "caf\u00e9 \u4e2d\u6587\n".encode()
    with fsspec.open(url, "wb") as f:
        f.write(data)
    try:
        [doc] = fetch_source(SourceConfig(url=url), store)
        check_document(doc, data, url, store)
    finally:
        fsspec.filesystem("memory").rm(url, recursive=True)


def test_memory_store_root():
    """The store itself can be any fsspec filesystem."""
    root = f"memory://store-{uuid.uuid4().hex}"
    try:
        [doc] = fetch_source(SourceConfig(url="builtin://timemachine"), root)
        assert doc.uri == f"{root.replace('memory://', 'memory:///')}/corpus/{doc.sha256}.txt"
        assert doc.sha1 == TIMEMACHINE_SHA1
        with fsspec.open(doc.uri, "rb") as f:
            assert hashlib.sha1(f.read()).hexdigest() == TIMEMACHINE_SHA1
        fs = fsspec.filesystem("memory")
        assert fs.ls(root.replace("memory://", "/") + "/corpus", detail=False) == [doc.uri.replace("memory://", "")]
    finally:
        fsspec.filesystem("memory").rm(root, recursive=True)


def test_http_url(http_dir, store):
    directory, base = http_dir
    write(directory / "sub" / "a.txt", TEXT)
    [doc] = fetch_source(SourceConfig(url=f"{base}/sub/a.txt", sha256=hashlib.sha256(TEXT).hexdigest()), store)
    check_document(doc, TEXT, f"{base}/sub/a.txt", store)


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_zip_member_chain(tmp_path, store, scheme):
    archive = tmp_path / "corpora.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("other.txt", b"not this one\n")
        z.writestr("inner/book.txt", TEXT)
    url = f"zip://inner/book.txt::{scheme}{archive}"
    [doc] = fetch_source(SourceConfig(url=url), store)
    check_document(doc, TEXT, url, store)


def test_glob_is_one_document_per_file_in_sorted_order(tmp_path, store):
    data = {"b.txt": b"second\n", "c.txt": b"third\n", "a.txt": b"first\n", "skip.md": b"not matched\n"}
    for name, content in data.items():
        write(tmp_path / "g" / name, content)
    docs = fetch_source(SourceConfig(url=str(tmp_path / "g" / "*.txt")), store)
    assert [d.source for d in docs] == [f"file://{tmp_path / 'g' / n}" for n in ("a.txt", "b.txt", "c.txt")]
    for doc, name in zip(docs, ("a.txt", "b.txt", "c.txt")):
        check_document(doc, data[name], doc.source, store)
    assert len(corpus_files(store)) == 3


def test_list_of_sources_keeps_order(tmp_path, store):
    one = write(tmp_path / "z.txt", b"zulu\n")
    two = write(tmp_path / "a.txt", b"alpha\n")
    docs = fetch_corpus([SourceConfig(url=str(one)), SourceConfig(url="builtin://timemachine"), SourceConfig(url=str(two))], store)
    assert [d.source for d in docs] == [str(one), "builtin://timemachine", str(two)]
    assert [d.num_bytes for d in docs] == [5, docs[1].num_bytes, 6]
    assert docs[1].sha1 == TIMEMACHINE_SHA1


def test_builtin_timemachine_with_its_sha1(store, timemachine_text):
    [doc] = fetch_source(SourceConfig(url="builtin://timemachine", sha1="090b5e7e70c295757f55df93cb0a180b9691891a"), store)
    assert doc.sha1 == TIMEMACHINE_SHA1 == "090b5e7e70c295757f55df93cb0a180b9691891a"
    check_document(doc, timemachine_text.encode(), "builtin://timemachine", store)


def test_default_root_is_rnnlm_storage(store):
    [doc] = fetch_corpus(DataConfig().sources)  # no root: $RNNLM_STORAGE (set by conftest)
    assert Path(doc.uri).parent == Path(store) / "corpus"


# ------------------------------------------------------------------------- errors


def test_local_file_not_found(tmp_path, store):
    url = str(tmp_path / "missing.txt")
    e = fetch_error(url, store)
    assert type(e) is CorpusError and not e.retryable
    assert e.source == url and "not found" in str(e)


def test_http_404_is_not_found(http_dir, store):
    _, base = http_dir
    e = fetch_error(f"{base}/missing.txt", store)
    assert type(e) is CorpusError and not e.retryable
    assert e.source == f"{base}/missing.txt" and "not found" in e.problem


def test_glob_matching_nothing(tmp_path, store):
    write(tmp_path / "a.txt", TEXT)
    e = fetch_error(str(tmp_path / "*.csv"), store)
    assert type(e) is CorpusError and "no file matches" in e.problem


def test_unknown_builtin(store):
    e = fetch_error("builtin://nosuchbook", store)
    assert "nosuchbook" in e.problem and "timemachine" in e.problem


def test_unreachable_host_is_retryable(store):
    url = f"http://127.0.0.1:{closed_port()}/a.txt"
    e = fetch_error(url, store)
    assert isinstance(e, SourceUnreachableError) and e.retryable
    assert e.source == url and "unreachable" in e.problem


def test_http_server_error_is_retryable(tmp_path, store):
    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(503, "try later")

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        e = fetch_error(f"http://127.0.0.1:{server.server_address[1]}/a.txt", store)
    finally:
        server.shutdown()
        server.server_close()
    assert isinstance(e, SourceUnreachableError) and e.retryable


@pytest.mark.parametrize("algo", ["sha1", "sha256"])
def test_checksum_mismatch(tmp_path, store, algo):
    path = write(tmp_path / "a.txt", TEXT)
    actual = hashlib.new(algo, TEXT).hexdigest()
    expected = hashlib.new(algo, TEXT + b"x").hexdigest()
    e = fetch_error(str(path), store, **{algo: expected})
    assert not e.retryable and e.source == str(path)
    assert "checksum mismatch" in e.problem and expected in e.problem and actual in e.problem and algo in e.problem


def test_builtin_checksum_mismatch(store):
    e = fetch_error("builtin://timemachine", store, sha1="0" * 40)
    assert "0" * 40 in e.problem and TIMEMACHINE_SHA1 in e.problem


def test_checksum_with_a_glob_of_several_files(tmp_path, store):
    write(tmp_path / "a.txt", b"a\n")
    write(tmp_path / "b.txt", b"b\n")
    e = fetch_error(str(tmp_path / "*.txt"), store, sha1=hashlib.sha1(b"a\n").hexdigest())
    assert "matches 2 files" in e.problem


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"", "empty text"),
        (b"  \n\t\r\n\n   \n", "empty text (11 bytes of whitespace only)"),
    ],
    ids=["empty", "whitespace-only"],
)
def test_empty_files(tmp_path, store, data, problem):
    path = write(tmp_path / "e.txt", data)
    e = fetch_error(str(path), store)
    assert e.problem == problem and e.source == str(path)
    assert corpus_files(store) == []


@pytest.mark.parametrize(
    "data, offset, byte",
    [
        (b"hello \xff world\n", 6, 0xFF),
        ("caf\u00e9\n".encode() + b"ab\xc3(\n", 8, 0xC3),  # a lead byte followed by a non-continuation
        ("\u4e2d\u6587\n".encode() + "\u4e2d".encode()[:2], 7, 0xE4),  # a character cut off at EOF
        (b"\x80 starts with a continuation byte\n", 0, 0x80),
    ],
    ids=["bad-byte", "bad-sequence", "split-at-end", "leading-continuation"],
)
def test_invalid_utf8_names_the_byte_offset(tmp_path, store, data, offset, byte):
    path = write(tmp_path / "bad.txt", data)
    e = fetch_error(str(path), store)
    assert e.problem == f"not UTF-8: invalid byte {byte:#04x} at offset {offset}"
    assert corpus_files(store) == []


def test_invalid_utf8_offset_past_the_first_read_block(tmp_path, store):
    # A valid 2-byte character straddles the block boundary (must not be an error),
    # then a bad byte follows: its offset counts every byte before it.
    head = b"a" * (READ_BLOCK - 1) + "\u00e9".encode()
    assert len(head) == READ_BLOCK + 1
    path = write(tmp_path / "big.txt", head + b"ok\xfe\n")
    e = fetch_error(str(path), store)
    assert e.problem == f"not UTF-8: invalid byte 0xfe at offset {READ_BLOCK + 3}"
    # ...and the same file without the bad byte is fine.
    path.write_bytes(head + b"ok\n")
    [doc] = fetch_source(SourceConfig(url=str(path)), store)
    assert doc.num_bytes == READ_BLOCK + 4


def test_binary_data(tmp_path, store):
    path = write(tmp_path / "b.bin", b"PK\x03\x04 text\x00\x01\x02")
    e = fetch_error(str(path), store)
    assert e.problem == "binary data, not text (NUL byte at offset 9)"
    assert corpus_files(store) == []


# ------------------------------------------------------- nothing half-written


def test_failed_fetch_in_a_list_leaves_only_complete_copies(tmp_path, store):
    good = write(tmp_path / "good.txt", TEXT)
    bad = write(tmp_path / "bad.txt", b"ok\n\x00")
    with pytest.raises(CorpusError, match="bad.txt"):
        prepare_dataset(DataConfig(sources=(SourceConfig(url=str(good)), SourceConfig(url=str(bad)))), store)
    assert corpus_files(store) == [f"{hashlib.sha256(TEXT).hexdigest()}.txt"]
    assert not (Path(store) / "datasets").exists()
    assert_clean_store(store)


def test_corpus_with_no_tokens_after_normalization(tmp_path, store):
    path = write(tmp_path / "digits.txt", b"1234 5678\n-- 90 --\n")
    with pytest.raises(CorpusError, match="no tokens after normalization") as info:
        prepare_dataset(DataConfig(sources=(SourceConfig(url=str(path)),)), store)
    assert str(path) in str(info.value)
    assert_clean_store(store)
    datasets = Path(store) / "datasets"
    assert not datasets.exists() or list(datasets.iterdir()) == []


def test_failure_while_writing_shards_removes_the_staging_dir(tmp_path, store):
    path = write(tmp_path / "a.txt", TEXT)
    cfg = DataConfig(sources=(SourceConfig(url=str(path)),), tokens_per_shard=8)
    docs = fetch_corpus(cfg.sources, store)
    vocab = Vocab.build({c: 1 for c in "abcdefghijklmnopqrstuvwxyz "})
    assert plan_chunks(docs, cfg.chunk_bytes)

    def encoded():
        yield np.arange(20, dtype=np.uint8)  # enough for two shards to be written
        raise OSError("disk went away")

    uri = str(Path(store) / "datasets" / "abc123")
    with pytest.raises(OSError, match="disk went away"):
        write_dataset(uri, docs, cfg, CountedVocab(vocab, 100, 27), encoded())
    assert list((Path(store) / "datasets").iterdir()) == []
    assert_clean_store(store)
