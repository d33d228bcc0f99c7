"""Fetch raw corpora into the artifact store, verified and content-addressed.

A source is a local path, any fsspec URL (``file://``, ``http(s)://``, ``s3://``,
``gs://``, ``memory://``, chained ``zip://member::https://...``), a glob that
expands to several files, or ``builtin://NAME`` for a corpus that ships inside
the package (``builtin://timemachine``, the offline default). Each file is one
document. Fetching streams the bytes once: it hashes them (sha1 and sha256),
checks they are UTF-8 text, and stores them as ``<root>/corpus/<sha256>.txt``,
so every later stage reads an immutable copy named by its content. Only bytes that
verified (text, declared checksums) are kept; a copy already stored is checked against
its name and quarantined if it fails; a store that cannot be written is only read.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import logging
import os
import uuid
from dataclasses import asdict, dataclass, replace
from importlib import resources

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline import storage
from pipeline.config import DataConfig, SourceConfig
from pipeline.errors import CorpusError, SourceUnreachableError, StorageError

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
    expected = {algo: getattr(source, algo) for algo in ("sha1", "sha256") if getattr(source, algo)}
    return [replace(_fetch_file(f, display, root, expected), split=source.split) for f, display in files]


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


def _fetch_file(open_file: fsspec.core.OpenFile, display: str, root: str, expected: dict[str, str]) -> Document:
    """Stream one file into the store, hashing and validating as the bytes pass.

    Only bytes that verified (UTF-8 text, the ``expected`` checksums) are kept. A copy
    already in the store is checked against its name and quarantined if it fails. When
    the store cannot be written (a read-only root) the bytes are only hashed: a verified
    copy already there is used, and without one the error names the root.
    """
    hashes = {"sha1": hashlib.sha1(), "sha256": hashlib.sha256()}
    decoder = codecs.getincrementaldecoder("utf-8")()
    fs, dir_path = storage.filesystem(storage.join(root, "corpus"))
    tmp = f"{dir_path}/.fetch-{uuid.uuid4().hex[:12]}"
    num_bytes, visible = 0, False
    try:
        copy = _open_for_writing(fs, dir_path, tmp, root)
        with open_file as src, (contextlib.closing(copy) if copy else contextlib.nullcontext()):
            while block := src.read(READ_BLOCK):
                _check_text(block, num_bytes, decoder, display)
                visible = visible or bool(block.strip())
                for h in hashes.values():
                    h.update(block)
                if copy:
                    copy.write(block)
                num_bytes += len(block)
            _check_text(b"", num_bytes, decoder, display, final=True)
        if num_bytes == 0 or not visible:
            raise CorpusError(display, "empty text" if num_bytes == 0 else f"empty text ({num_bytes} bytes of whitespace only)")
        digests = {algo: h.hexdigest() for algo, h in hashes.items()}
        for algo, want in expected.items():
            if want != digests[algo]:
                raise CorpusError(display, f"checksum mismatch: expected {algo} {want}, got {digests[algo]}")
        final = f"{dir_path}/{digests['sha256']}.txt"
        stored = copy is not None and copy.full is None
        _store(fs, tmp if stored else None, final, num_bytes, root,
               refused=copy.full if copy and copy.full else "read-only or no permission")
    except StorageError:  # the store, not the source (an OSError too)
        raise
    except FileNotFoundError as e:
        raise _not_found(display, e) from None
    except PermissionError as e:
        raise CorpusError(display, f"permission denied reading it: {e}") from None
    except OSError as e:  # connection refused, DNS failure, timeouts, HTTP 5xx
        if storage.is_disk_full(e):  # writing the copy failed: the root is full, the source is fine
            raise storage.unwritable(root, f"the copy of {display} under {storage.join(root, 'corpus')}", e) from None
        if storage.is_permanent_error(e):  # access denied, no such bucket: asking again cannot help
            raise CorpusError(display, f"refused: {e}") from None
        raise SourceUnreachableError(display, f"unreachable: {e}") from None
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
    uri = final if storage.is_local(root) else fs.unstrip_protocol(final)
    log.info("fetched %s: %d bytes, sha256 %s", display, num_bytes, digests["sha256"][:12])
    return Document(source=display, uri=uri, sha1=digests["sha1"], sha256=digests["sha256"], num_bytes=num_bytes)


def _open_for_writing(fs, dir_path: str, tmp: str, root: str):
    """The temp file to stream the copy into, or None when the store cannot be written."""
    corpus_url = storage.join(root, "corpus")
    try:
        fs.makedirs(dir_path, exist_ok=True)  # the first write of a run: a bad store fails here, clearly
        return _Copy(fs.open(tmp, "wb"))
    except OSError as e:
        if not storage.is_unwritable(e):
            raise StorageError(corpus_url, f"cannot write to it: {e}", retryable=True) from e
        try:
            there = fs.isdir(dir_path)
        except OSError:
            there = False
        if not there:
            raise storage.unwritable(root, f"the corpus directory {corpus_url}", e) from None
        return None


class _Copy:
    """The copy being streamed into the store. A full disk stops the copy, not the hashing: a
    verified copy may already be stored (``full`` holds the error, for when it is not)."""

    def __init__(self, f):
        self.f, self.full = f, None

    def write(self, block: bytes) -> None:
        if self.full is None:
            try:
                self.f.write(block)
            except OSError as e:
                if not storage.is_disk_full(e):
                    raise
                self.full = e

    def close(self) -> None:
        try:
            self.f.close()
        except OSError as e:
            if not storage.is_disk_full(e):
                raise
            self.full = self.full or e


def _store(fs, tmp: str | None, final: str, num_bytes: int, root: str,
           refused: BaseException | str = "read-only or no permission") -> None:
    """Put the verified bytes at ``final``, unless a verified copy is already there (``tmp`` None:
    no copy could be written, ``refused`` says why)."""
    if fs.exists(final):
        problem = _copy_problem(fs, final, num_bytes)
        if problem is None:
            return
        if tmp is None:
            raise storage.unwritable(root, f"a good copy over {final}, which {problem}", refused)
        moved = storage.quarantine(final if storage.is_local(root) else fs.unstrip_protocol(final), root)
        log.warning("corpus copy %s %s: moved to %s; storing the fresh copy", final, problem, moved)
    elif tmp is None:
        raise storage.unwritable(root, f"the corpus copy {final}", refused)
    if isinstance(fs, LocalFileSystem):
        os.replace(tmp, final)
    else:
        fs.mv(tmp, final)


def _copy_problem(fs, path: str, num_bytes: int) -> str | None:
    """What is wrong with a stored copy named ``<sha256>.txt`` (None: it holds those bytes)."""
    size = fs.size(path)
    if size != num_bytes:
        return f"holds {size} bytes, expected {num_bytes}"
    sha256 = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            sha256.update(block)
    name = path.rsplit("/", 1)[-1].removesuffix(".txt")
    return None if sha256.hexdigest() == name else f"has sha256 {sha256.hexdigest()}, not the one it is named by"


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
