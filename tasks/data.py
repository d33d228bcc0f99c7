"""Data stages as Prefect tasks: fetch -> count (per chunk) -> vocab -> encode (per chunk) -> shards.

Thin wrappers over ``pipeline.data.corpus`` / ``pipeline.data.prepare``: each calls the very function
``prepare_dataset`` calls and adds only caching and the persisting of what passes between stages. Each returns a small JSON
manifest (``tasks.caching.manifest``): a content ``id``, numbers, and the URIs of what it
wrote (``artifacts``). Token counts and token ids never travel through Prefect: they go
to files under ``<root>/work/`` and are passed on as URIs.

Cache identities (see ``tasks.caching``):

* ``fetch_corpus``: a fetch cannot know the bytes before fetching them, so its key is the
  source URL + the declared checksums + a cheap validator of the remote object
  (``fsspec`` ``info()``: size and mtime for local files, ETag / Last-Modified /
  size over HTTP and object stores; the package file's size and mtime for
  ``builtin://``). If no validator can be had (the source is unreachable, or the
  server reports nothing), the fetch is not cached at all: it always runs, which is
  cheap, since the copy is content-addressed and an unchanged file lands on the same
  ``<root>/corpus/<sha256>.txt``. Downstream stages key on that sha256, so a fetch that
  re-runs never invalidates them unless the bytes changed. Known limit: an edit that
  keeps a local file's size and mtime (``touch -r``) is invisible until the next
  uncached fetch; declare a checksum to pin the content.
* ``count_tokens`` / ``encode_shards``: the document's sha256 + the chunk's byte range
  + the tokenizer config (+ the vocabulary's id for encode).
* ``build_vocab``: the count manifests' ids (with their chunks' splits) + the vocab config
  + the token hash of a pinned vocabulary (its content, read at each cache check).
* ``write_shards``: ``pipeline.data.prepare.dataset_id`` (document hashes + every dataset
  setting + ``DATA_FORMAT_VERSION``) + the vocab and encoded manifests' ids.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from pipeline import storage

from pipeline.data import prepare
from pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from pipeline.data.corpus import Document, builtin_path, fetch_source
from pipeline.errors import DatasetError, PipelineError
from pipeline.data.prepare import DATA_FORMAT_VERSION, Chunk, dataset_id, plan_chunks
from pipeline.data.integrity import verified_dataset
from pipeline.data.shards import MANIFEST, open_dataset, parquet_bytes, read_vocab
from tasks.caching import StagePolicy, content_id, jsonable, manifest

# Bump a stage's number when its outputs change meaning (the task source is hashed too).
VERSION = {"fetch": 1, "count": 1, "vocab": 1, "encode": 1, "shards": 1}


def _v(stage: str) -> int:
    return VERSION[stage] * 1000 + DATA_FORMAT_VERSION


# --------------------------------------------------------------------------------- fetch


def source_validator(url: str) -> dict[str, Any] | None:
    """Cheap evidence that a source is unchanged, without reading it; None if unavailable."""
    import fsspec

    try:
        if url.startswith("builtin://"):
            st = __import__("os").stat(builtin_path(url))
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if any(c in url for c in "*?["):
            return None  # a glob: the set of files may change; always fetch
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
    except Exception:  # unreachable, not found, no filesystem: let the fetch itself say why
        return None
    keep = {k: info.get(k) for k in ("size", "ETag", "etag", "Last-Modified", "LastModified", "mtime", "md5Hash", "generation") if info.get(k) is not None}
    if "mtime" in keep:
        keep["mtime"] = str(keep["mtime"])
    if set(keep) <= {"size"}:  # size alone is no evidence the content is the same
        return None
    return keep


def fetch_identity(inputs: dict[str, Any]):
    source = inputs["source"]
    source = source if isinstance(source, SourceConfig) else SourceConfig.model_validate(source)
    validator = source_validator(source.url)
    if validator is None:
        return None
    return _v("fetch"), {"source": source.model_dump(mode="json"), "validator": validator, "root": storage.storage_root(inputs.get("root"))}


@task(name="fetch_corpus", cache_policy=StagePolicy(stage="fetch", identity=fetch_identity), tags=["data"])
def fetch_corpus(source: SourceConfig, root: str | None = None) -> dict[str, Any]:
    """Fetch one source into ``<root>/corpus/<sha256>.txt``; verify declared checksums."""
    logger = get_run_logger()
    documents = fetch_source(source, storage.storage_root(root))
    for d in documents:
        logger.info("fetched %s: %d bytes, sha256 %s", d.source, d.num_bytes, d.sha256[:12])
    ident = [d.sha256 for d in documents]
    return manifest(content_id("fetch", _v("fetch"), ident), [d.uri for d in documents],
                    documents=[d.to_dict() for d in documents])


# ------------------------------------------------------------------------ plan (no task)


def plan(documents: list[dict[str, Any]], chunk_bytes: int, tokenizer: TokenizerConfig) -> list[dict[str, Any]]:
    """Line-aligned byte ranges of the fetched documents; cheap (seeks), so not a task."""
    docs = [Document(**d) for d in documents]
    sha = {d.uri: d.sha256 for d in docs}
    return [{**asdict(c), "sha256": sha[c.uri]} for c in plan_chunks(docs, chunk_bytes, tokenizer)]


def _chunk(ref: dict[str, Any]) -> Chunk:
    return Chunk(ref["uri"], ref["start"], ref["end"], ref.get("split"), ref.get("source", ""), ref.get("continues", False))


def _chunk_identity(ref: dict[str, Any]) -> dict[str, Any]:
    return {"sha256": ref["sha256"], "start": ref["start"], "end": ref["end"]}


# --------------------------------------------------------------------------------- count


def count_identity(inputs: dict[str, Any]):
    return _v("count"), {"chunk": _chunk_identity(inputs["chunk"]), "tokenizer": jsonable(inputs["tokenizer"]),
                         "root": storage.storage_root(inputs.get("root"))}


@task(name="count_tokens", cache_policy=StagePolicy(stage="count", identity=count_identity), tags=["data"])
def count_tokens(chunk: dict[str, Any], tokenizer: TokenizerConfig, root: str | None = None) -> dict[str, Any]:
    """Token counts of one chunk, written to ``<root>/work/counts/<id>.json``."""
    root = storage.storage_root(root)
    cid = content_id("count", *count_identity({"chunk": chunk, "tokenizer": tokenizer, "root": root}))
    counts = prepare.count_chunk(_chunk(chunk), tokenizer)
    uri = storage.join(root, "work", "counts", f"{cid}.json")
    storage.write_bytes_atomic(uri, json.dumps(counts, ensure_ascii=False).encode("utf-8"))
    return manifest(cid, [uri], uri=uri, num_tokens=sum(counts.values()), distinct=len(counts))


# --------------------------------------------------------------------------------- vocab


def vocab_identity(inputs: dict[str, Any]):
    data = inputs["data"] if isinstance(inputs["data"], DataConfig) else DataConfig.model_validate(inputs["data"])
    counts = [[ref.get("split"), c["id"]] for ref, c in zip(inputs["chunks"], inputs["counts"], strict=True)]
    try:  # a pinned vocabulary by content: the file at its URI may change
        pinned = prepare.pinned_vocab(data)
    except PipelineError:
        return None  # not cached: the task itself reports the problem
    return _v("vocab"), {"counts": counts, "vocab": data.vocab.model_dump(mode="json"),
                         "pinned": pinned.sha256 if pinned else None, "root": storage.storage_root(inputs.get("root"))}


@task(name="build_vocab", cache_policy=StagePolicy(stage="vocab", identity=vocab_identity), tags=["data"])
def build_vocab(chunks: list[dict[str, Any]], counts: list[dict[str, Any]], data: DataConfig,
                root: str | None = None) -> dict[str, Any]:
    """``pipeline.data.prepare.build_vocab`` over the chunks' counts; the vocabulary goes to ``<root>/work/vocab/``."""
    root = storage.storage_root(root)
    vid = content_id("vocab", *vocab_identity({"chunks": chunks, "counts": counts, "data": data, "root": root}))
    pinned = prepare.pinned_vocab(data)
    counted = prepare.build_vocab([_chunk(c) for c in chunks], (json.loads(storage.read_bytes(c["uri"])) for c in counts),
                                  data, pinned)
    uri = storage.join(root, "work", "vocab", f"{vid}.parquet")
    storage.write_bytes_atomic(uri, parquet_bytes(counted.vocab.to_table()))
    get_run_logger().info("vocabulary: %d tokens from %d distinct; %d tokens in the corpus",
                          len(counted.vocab), counted.distinct, counted.num_tokens)
    return manifest(vid, [uri], uri=uri, vocab_size=len(counted.vocab), distinct=counted.distinct,
                    num_tokens=counted.num_tokens, split_tokens=counted.split_tokens, tokens_sha256=counted.vocab.sha256,
                    pinned_sha256=pinned.sha256 if pinned else None)


def _counted(vocab: dict[str, Any]) -> prepare.CountedVocab:
    return prepare.CountedVocab(read_vocab(vocab["uri"]), vocab["num_tokens"], vocab["distinct"], vocab["split_tokens"])


# -------------------------------------------------------------------------------- encode


def encode_identity(inputs: dict[str, Any]):
    return _v("encode"), {"chunk": _chunk_identity(inputs["chunk"]), "tokenizer": jsonable(inputs["tokenizer"]),
                          "vocab": inputs["vocab"]["id"], "root": storage.storage_root(inputs.get("root"))}


@task(name="encode_shards", cache_policy=StagePolicy(stage="encode", identity=encode_identity), tags=["data"])
def encode_shards(chunk: dict[str, Any], tokenizer: TokenizerConfig, vocab: dict[str, Any],
                  root: str | None = None) -> dict[str, Any]:
    """Token ids of one chunk, written to ``<root>/work/encoded/<id>.parquet``."""
    root = storage.storage_root(root)
    eid = content_id("encode", *encode_identity({"chunk": chunk, "tokenizer": tokenizer, "vocab": vocab, "root": root}))
    ids = prepare.encode_chunk(_chunk(chunk), tokenizer, read_vocab(vocab["uri"]))
    uri = storage.join(root, "work", "encoded", f"{eid}.parquet")
    storage.write_bytes_atomic(uri, parquet_bytes(pa.table({"ids": ids})))
    return manifest(eid, [uri], uri=uri, num_tokens=int(len(ids)))


def _read_ids(uri: str) -> np.ndarray:
    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(uri))).column("ids").to_numpy()
    except (FileNotFoundError, KeyError, pa.ArrowException) as e:
        raise DatasetError(f"encoded chunk {uri} is missing or corrupt: {e}") from None


# -------------------------------------------------------------------------------- shards


def _documents(fetched: list[dict[str, Any]]) -> list[Document]:
    return [Document(**d) for f in fetched for d in f["documents"]]


def shards_identity(inputs: dict[str, Any]):
    cfg = inputs["data"] if isinstance(inputs["data"], DataConfig) else DataConfig.model_validate(inputs["data"])
    did = dataset_id(_documents(inputs["fetched"]), cfg, inputs["vocab"].get("pinned_sha256"))
    return _v("shards"), {"dataset_id": did, "vocab": inputs["vocab"]["id"],
                          "encoded": [e["id"] for e in inputs["encoded"]], "root": storage.storage_root(inputs.get("root"))}


def shards_problem(cached: dict[str, Any], inputs: dict[str, Any]) -> str | None:
    """The cache check of ``write_shards``: a cached dataset that fails verification is quarantined,
    so the stage runs again and rebuilds it from the encoded chunks."""
    uri = cached.get("uri")
    if not uri or verified_dataset(uri, storage.storage_root(inputs.get("root"))) is not None:
        return None
    return f"dataset {uri} failed verification and was quarantined (see the warning above)"


@task(name="write_shards", cache_policy=StagePolicy(stage="shards", identity=shards_identity, verify=shards_problem),
      tags=["data"])
def write_shards(fetched: list[dict[str, Any]], data: DataConfig, vocab: dict[str, Any], encoded: list[dict[str, Any]],
                 root: str | None = None) -> dict[str, Any]:
    """Assemble the encoded chunks, in order, into ``<root>/datasets/<dataset_id>``."""
    logger = get_run_logger()
    root = storage.storage_root(root)
    documents = _documents(fetched)
    did = dataset_id(documents, data, vocab.get("pinned_sha256"))
    uri = prepare.dataset_uri(documents, data, root, vocab.get("pinned_sha256"))
    if verified_dataset(uri, root) is not None:
        logger.info("dataset %s already written at %s", did, uri)
    else:
        prepare.write_dataset(uri, documents, data, _counted(vocab), (_read_ids(e["uri"]) for e in encoded))
    ds = open_dataset(uri)
    m = ds.manifest
    splits = {k: v["num_tokens"] for k, v in m["splits"].items()}
    logger.info("dataset %s: %d tokens (train %d, val %d, test %d), vocab %d", did, m["num_tokens"],
                splits["train"], splits["val"], splits["test"], m["vocab_size"])
    manifest_uri = storage.join(uri, MANIFEST)
    return manifest(did, [manifest_uri], uri=uri, dataset_id=did, num_tokens=m["num_tokens"], vocab_size=m["vocab_size"],
                    level=m["tokenizer"]["level"], splits=splits,
                    manifest_sha256=storage.sha256_bytes(storage.read_bytes(manifest_uri)),
                    sources=[{"source": d.source, "sha256": d.sha256, "bytes": d.num_bytes} for d in documents])
