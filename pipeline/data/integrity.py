"""Is a stored artifact what its manifest says? And if not, out of the way with it.

``verify_dataset`` hashes every file a dataset's manifest lists (``shards.verified_buffer``
remembers what this process already hashed, so training or evaluating right after costs no
second hash); ``verified_dataset`` is the reuse check of ``prepare_dataset`` and of the
flows' ``write_shards`` stage: a dataset that fails is quarantined (``storage.quarantine``)
with a warning naming the file, so the caller rebuilds it.
"""

from __future__ import annotations

import logging

from pipeline import storage
from pipeline.errors import DatasetError
from pipeline.data.shards import MANIFEST, VOCAB_FILE, Dataset, is_complete, open_dataset, verified_buffer

log = logging.getLogger(__name__)


def verify_dataset(uri: str) -> str | None:
    """What is wrong with the dataset at ``uri``, or None when every file its manifest lists
    is there with its sha256. Reads each file once; this process does not hash it again
    on a later read unless it changed (``shards.verified_buffer``)."""
    try:
        m = open_dataset(uri).manifest
        files = [(VOCAB_FILE, m["vocab"]["sha256"])]
        files += [(shard["file"], shard["sha256"]) for split in m["splits"].values() for shard in split["shards"]]
        for name, sha256 in files:
            verified_buffer(storage.join(uri, name), sha256)
    except DatasetError as e:
        return str(e)
    except (KeyError, TypeError, AttributeError) as e:
        return f"corrupt manifest {storage.join(uri, MANIFEST)}: no {e}"
    return None


def verified_dataset(uri: str, root: str) -> Dataset | None:
    """The dataset at ``uri`` if it is there and verifies; else None, to be (re)built.

    One that fails verification (a file corrupt or missing, a broken manifest) is moved
    to ``<root>/quarantine/`` with a warning naming the file, never deleted. Locally, a
    directory without a manifest is a broken one too (publishing is one rename); on an
    object store it may be another worker's publish in progress, so it is left alone.
    """
    if not is_complete(uri):
        if not (storage.is_local(uri) and storage.exists(uri)):
            return None
        problem = f"no {MANIFEST}"
    else:
        problem = verify_dataset(uri)
        if problem is None:
            return open_dataset(uri)
    moved = storage.quarantine(uri, root)
    log.warning("dataset %s fails verification (%s): moved to %s; rebuilding it", uri, problem, moved)
    return None
