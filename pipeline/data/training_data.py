"""The token splits a training run reads: loaded from a dataset URI, checked before any work."""

from __future__ import annotations

import numpy as np

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError, DatasetError
from pipeline.data.sampling import num_batches


def load_dataset(uri: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(train ids, val ids, vocab size) of a prepared dataset.

    ``*.npz`` files with ``train``, ``val`` and ``vocab_size`` arrays are read
    directly (tests, quick experiments); anything else goes to ``pipeline.data.shards``,
    and its training split is a read-only memory map of the host's cached copy, shared by
    the ranks of the host (``pipeline.data.split_cache``).
    """
    if uri.endswith(".npz"):
        try:
            with np.load(storage.local_path(uri)) as z:
                return z["train"], z["val"], int(z["vocab_size"])
        except (OSError, KeyError, ValueError) as e:
            raise DatasetError(f"dataset {uri} is unusable: {e}") from None
    from pipeline.data.shards import open_dataset
    from pipeline.data.split_cache import mapped_split

    ds = open_dataset(uri)
    val = np.array(mapped_split(ds, "val"))  # small, and validation reads all of it every time
    return mapped_split(ds, "train"), val, int(ds.vocab_size)


def dataset_vocab_size(uri: str) -> int:
    """The vocabulary size of a prepared dataset (or ``*.npz``), without loading its splits."""
    if uri.endswith(".npz"):
        try:
            with np.load(storage.local_path(uri)) as z:
                return int(z["vocab_size"])
        except (OSError, KeyError, ValueError) as e:
            raise DatasetError(f"dataset {uri} is unusable: {e}") from None
    from pipeline.data.shards import open_dataset

    return int(open_dataset(uri).vocab_size)


def id_range(ids: np.ndarray, chunk: int = 1 << 22) -> tuple[int, int]:
    """The smallest and largest id, a chunk at a time: a memory-mapped split is scanned
    without becoming resident in this process (``split_cache.release``)."""
    from pipeline.data.split_cache import release

    lo, hi = None, None
    for start in range(0, len(ids), chunk):
        part = ids[start: start + chunk]
        lo = int(part.min()) if lo is None else min(lo, int(part.min()))
        hi = int(part.max()) if hi is None else max(hi, int(part.max()))
        release(ids)
    return lo, hi


def check_inputs(train_ids, val_ids, vocab_size, cfg: TrainConfig, world_size: int) -> None:
    """Fail early, and as do-not-retry, on inputs that cannot work."""
    if cfg.batch_size % world_size:
        raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by the "
                          f"{world_size} ranks (it is the global batch)")
    if num_batches(len(train_ids), cfg.batch_size, cfg.num_steps, cfg.sampling) < 1:
        raise ConfigError(f"the training split ({len(train_ids)} tokens) is too short for one "
                          f"batch of {cfg.batch_size} x {cfg.num_steps} tokens")
    for name, ids in (("train", train_ids), ("val", val_ids)):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise DatasetError(f"{name} split must be 1-D integer token ids, got {ids.dtype} {ids.shape}")
        lo, hi = id_range(ids) if len(ids) else (0, 0)
        if lo < 0 or hi >= vocab_size:
            raise DatasetError(f"{name} split has token ids outside [0, {vocab_size}): [{lo}, {hi}]")
