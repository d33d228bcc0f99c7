"""Fetch raw corpora into the artifact store, verified and content-addressed.

A source is a local path, any fsspec URL (``file://``, ``http(s)://``, ``s3://``,
``gs://``, ``memory://``, chained ``zip://member::https://...``), a glob that
expands to several files, or ``builtin://NAME`` for a corpus that ships inside
the package (``builtin://timemachine``, the offline default). Each file is one
document. Fetching streams the bytes once: it hashes them (sha1 and sha256),
checks they are UTF-8 text, and stores them as ``<root>/corpus/<sha256>.txt``,
so every later stage reads an immutable copy named by its content.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import uuid
from dataclasses import asdict, dataclass, replace
from importlib import resources

import fsspec

from pipeline import storage
from pipeline.config import DataConfig, SourceConfig
from pipeline.errors import CorpusError, SourceUnreachableError

log = logging.getLogger(__name__)

BUILTIN_CORPORA = {"timemachine": "timemachine.txt"}
READ_BLOCK = 8 * 2**20


@dataclass(frozen=True)
class Document:
    """One fetched file: where it came from and the immutable copy every stage reads."""

    source: str  # the URL as the user wrote it (expanded, for globs)
    uri: str  # the content-addressed copy in the store
    sha1: str
    sha256: str
    num_bytes: int
    split: str | None = None  # the split its source names, if any

    def to_dict(self) -> dict:
        return asdict(self)


def builtin_path(url: str) -> str:
    name = url[len("builtin://") :]
    if name not in BUILTIN_CORPORA:
        raise CorpusError(url, f"unknown builtin corpus {name!r}; available: {', '.join(BUILTIN_CORPORA)}")
    return str(resources.files("pipeline") / "data" / BUILTIN_CORPORA[name])


def fetch_corpus(sources: tuple[SourceConfig, ...] | list[SourceConfig], root: str | None = None) -> list[Document]:
    """Fetch every source (in order; globs expand in sorted order) into the store."""
    root = storage.storage_root(root)
    documents = [doc for source in sources for doc in fetch_source(source, root)]
    log.info("fetched %d document(s), %d bytes", len(documents), sum(d.num_bytes for d in documents))
    return documents


def located_sources(cfg: DataConfig) -> tuple[SourceConfig, ...]:
    """The sources to fetch: with ``cfg.root_dir``, each from ``root_dir/<its file name>``."""
    if cfg.root_dir is None:
        return cfg.sources
    root = cfg.root_dir.rstrip("/")
    return tuple(s.model_copy(update={"url": f"{root}/{source_file_name(s.url)}"}) for s in cfg.sources)


def source_file_name(url: str) -> str:
    """The file a source URL names: the last path part of its first link (``zip://d/b.txt::https://..`` -> ``b.txt``)."""
    name = url.split("::", 1)[0].split("://", 1)[-1].rstrip("/").rsplit("/", 1)[-1]
    if not name or any(c in name for c in "*?["):
        raise CorpusError(url, "data.root_dir cannot place this source: its URL names no single file")
    return name


def fetch_source(source: SourceConfig, root: str | None = None) -> list[Document]:
    root = storage.storage_root(root)
    files = _expand(source.url)
    if (source.sha1 or source.sha256) and len(files) != 1:
        raise CorpusError(source.url, f"a checksum was given but the URL matches {len(files)} files; give one file per checksum")
    documents = []
    for open_file, display in files:
        doc = replace(_fetch_file(open_file, display, root), split=source.split)
        for algo in ("sha1", "sha256"):
            expected = getattr(source, algo)
            actual = getattr(doc, algo)
            if expected and expected != actual:
                raise CorpusError(display, f"checksum mismatch: expected {algo} {expected}, got {actual}")
        documents.append(doc)
    return documents


def _expand(url: str) -> list[tuple[fsspec.core.OpenFile, str]]:
    """Resolve a source URL to the files it names, with a display name for each."""
    if url.startswith("builtin://"):
        return [(fsspec.open(builtin_path(url), "rb"), url)]
    try:
        files = fsspec.open_files(url, "rb")
    except FileNotFoundError as e:
        raise _not_found(url, e) from None
    except ValueError as e:  # unknown protocol, malformed chained URL
        raise CorpusError(url, f"not a usable URL: {e}") from None
    except ImportError as e:  # e.g. s3:// without s3fs installed
        raise CorpusError(url, f"its filesystem is not installed: {e}") from None
    except OSError as e:
        raise SourceUnreachableError(url, f"unreachable: {e}") from None
    if not files:
        raise CorpusError(url, "not found (no file matches)")
    many = len(files) > 1 or any(c in url for c in "*?[")
    files = sorted(files, key=lambda f: f.path)
    return [(f, f.full_name if many else url) for f in files]


def _fetch_file(open_file: fsspec.core.OpenFile, display: str, root: str) -> Document:
    """Stream one file into the store, hashing and validating as the bytes pass."""
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    corpus_dir = storage.join(root, "corpus")
    fs, dir_path = storage.filesystem(corpus_dir)
    fs.makedirs(dir_path, exist_ok=True)
    local = storage.is_local(corpus_dir)
    tmp = f"{dir_path}/.fetch-{uuid.uuid4().hex[:12]}"
    num_bytes, visible = 0, False
    try:
        with open_file as src, fs.open(tmp, "wb") as dst:
            while block := src.read(READ_BLOCK):
                _check_text(block, num_bytes, decoder, display)
                visible = visible or bool(block.strip())
                sha1.update(block)
                sha256.update(block)
                dst.write(block)
                num_bytes += len(block)
            _check_text(b"", num_bytes, decoder, display, final=True)
        if num_bytes == 0 or not visible:
            raise CorpusError(display, "empty text" if num_bytes == 0 else f"empty text ({num_bytes} bytes of whitespace only)")
        digest = sha256.hexdigest()
        final = f"{dir_path}/{digest}.txt"
        if fs.exists(final):  # the same bytes were fetched before: keep that copy
            fs.rm(tmp)
        elif local:
            os.replace(tmp, final)
        else:
            fs.mv(tmp, final)
    except FileNotFoundError as e:
        raise _not_found(display, e) from None
    except PermissionError as e:
        raise CorpusError(display, f"permission denied: {e}") from None
    except OSError as e:  # connection refused, DNS failure, timeouts, HTTP 5xx
        raise SourceUnreachableError(display, f"unreachable: {e}") from None
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
    uri = final if local else fs.unstrip_protocol(final)
    log.info("fetched %s: %d bytes, sha256 %s", display, num_bytes, digest[:12])
    return Document(source=display, uri=uri, sha1=sha1.hexdigest(), sha256=digest, num_bytes=num_bytes)


def _not_found(display: str, e: FileNotFoundError) -> CorpusError:
    """Tell "not found" from "could not reach it".

    fsspec's HTTP filesystem raises FileNotFoundError for *every* failure to stat a
    URL (refused connection, timeout, HTTP 5xx, 404) and chains the real cause;
    only a 404/410 (or no chained cause) means the file is not there.
    """
    cause = e.__cause__
    status = getattr(cause, "status", None)
    if cause is None or isinstance(cause, FileNotFoundError) or status in (404, 410):
        return CorpusError(display, "not found")
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return CorpusError(display, f"refused: HTTP {status} {getattr(cause, 'message', '')}".rstrip())
    return SourceUnreachableError(display, f"unreachable: {type(cause).__name__}: {cause}")


def _check_text(block: bytes, offset: int, decoder: codecs.IncrementalDecoder, display: str, final: bool = False) -> None:
    """Reject binary data (NUL bytes) and invalid UTF-8, naming the byte offset."""
    nul = block.find(b"\0")
    if nul >= 0:
        raise CorpusError(display, f"binary data, not text (NUL byte at offset {offset + nul})")
    pending = len(decoder.getstate()[0])  # bytes of a split character held from the last block
    if not pending and block.isascii():  # ASCII is valid UTF-8 and ends on a character boundary
        return
    try:
        decoder.decode(block, final)
    except UnicodeDecodeError as e:
        raise CorpusError(display, f"not UTF-8: invalid byte {e.object[e.start]:#04x} at offset {offset - pending + e.start}") from None
