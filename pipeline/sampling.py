"""Minibatches of (X, Y) token windows, with the semantics of d2l ch. 8.3.

Both samplers start at a random offset in ``[0, num_steps)`` so every epoch sees
different window boundaries, and ``Y`` is ``X`` shifted by one token.

* ``random``: the corpus is cut into non-overlapping windows of ``num_steps``
  tokens, shuffled, and grouped into batches. Neighbouring windows of a batch are
  unrelated, so the hidden state is reset for every batch.
* ``sequential``: the corpus is cut into ``batch_size`` parallel streams; batch
  ``i+1`` continues batch ``i`` row by row, so the hidden state carries over
  (detached) from one batch to the next.

DDP: all ranks draw the same global batch from the same seeded generator and
each keeps its own contiguous block of ``batch_size // world_size`` rows. Rank
``r`` therefore always owns the same streams in sequential mode, and the ranks
together see exactly what one process with the full batch sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np

Sampling = Literal["random", "sequential"]


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator for one epoch's offsets and shuffles: same on every rank."""
    return np.random.default_rng([seed, epoch])


def rank_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """The rows of a global batch that ``rank`` trains on."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by world size {world_size}")
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def num_batches(num_tokens: int, batch_size: int, num_steps: int, sampling: Sampling) -> int:
    """Batches per epoch, for the worst case offset (``num_steps - 1``).

    Every epoch yields exactly this many batches whatever its random offset, so
    epochs are the same length and a step count identifies a position.
    """
    # Both samplers cut the same number of windows: random shuffles them into
    # batches, sequential lays them side by side as streams.
    usable = num_tokens - (num_steps - 1) - 1  # minus the worst offset, minus the Y shift
    return max(usable // (batch_size * num_steps), 0)


def batches(
    corpus: np.ndarray,
    batch_size: int,
    num_steps: int,
    sampling: Sampling,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(X, Y)`` int64 arrays of shape ``(batch_size // world_size, num_steps)``.

    ``start`` skips the first ``start`` batches of the epoch (resuming mid-epoch).
    """
    rows = rank_rows(batch_size, rank, world_size)
    n = num_batches(len(corpus), batch_size, num_steps, sampling)
    if n == 0:
        raise ValueError(
            f"corpus of {len(corpus)} tokens is too short for one batch of "
            f"{batch_size} x {num_steps} tokens"
        )
    rng = epoch_rng(seed, epoch)
    offset = int(rng.integers(0, num_steps))
    if sampling == "random":
        yield from _random_batches(corpus, batch_size, num_steps, n, offset, rng, rows, start)
    elif sampling == "sequential":
        yield from _sequential_batches(corpus, batch_size, num_steps, n, offset, rows, start)
    else:
        raise ValueError(f"unknown sampling {sampling!r}: expected 'random' or 'sequential'")


def _random_batches(corpus, batch_size, num_steps, n, offset, rng, rows, start):
    # As d2l: shuffle every window that fits after the offset, use the first n batches' worth.
    num_windows = (len(corpus) - offset - 1) // num_steps
    window_starts = offset + num_steps * rng.permutation(num_windows)[: n * batch_size]
    window = np.arange(num_steps)
    for i in range(start, n):
        starts = window_starts[i * batch_size : (i + 1) * batch_size][rows]
        index = starts[:, None] + window  # (rows, num_steps) token positions
        yield corpus[index].astype(np.int64), corpus[index + 1].astype(np.int64)


def _sequential_batches(corpus, batch_size, num_steps, n, offset, rows, start):
    stream_len = n * num_steps
    length = batch_size * stream_len
    xs = corpus[offset : offset + length].reshape(batch_size, stream_len)[rows]
    ys = corpus[offset + 1 : offset + 1 + length].reshape(batch_size, stream_len)[rows]
    for i in range(start, n):
        cols = slice(i * num_steps, (i + 1) * num_steps)
        yield xs[:, cols].astype(np.int64), ys[:, cols].astype(np.int64)


# ------------------------------------------------------------------ on the device


def window_starts(num_tokens: int, batch_size: int, num_steps: int, sampling: Sampling, *,
                  seed: int, epoch: int) -> np.ndarray:
    """Where every window of the epoch starts, ``(num_batches, batch_size)``: row ``b`` of
    batch ``i`` is ``corpus[s : s + num_steps]`` with ``s = starts[i, b]`` (``Y`` from ``s + 1``).
    The same draws from the same generator as ``batches``, so the same windows."""
    n = num_batches(num_tokens, batch_size, num_steps, sampling)
    rng = epoch_rng(seed, epoch)
    offset = int(rng.integers(0, num_steps))
    if sampling == "random":
        num_windows = (num_tokens - offset - 1) // num_steps
        return (offset + num_steps * rng.permutation(num_windows)[: n * batch_size]).reshape(n, batch_size)
    if sampling == "sequential":  # stream b is the b-th contiguous stretch of n * num_steps tokens
        return offset + n * num_steps * np.arange(batch_size)[None, :] + num_steps * np.arange(n)[:, None]
    raise ValueError(f"unknown sampling {sampling!r}: expected 'random' or 'sequential'")


def device_batches(tokens, batch_size: int, num_steps: int, sampling: Sampling, *, seed: int, epoch: int,
                   rank: int = 0, world_size: int = 1, start: int = 0):
    """``batches`` over ``tokens``, a 1-D integer tensor that already lives on the device.

    The epoch's window starts go to the device once; each batch is then one gather there,
    with no copy from the host per step (a pageable host-to-device copy waits for the
    device). Yields int64 ``(X, Y)`` tensors, the same values ``batches`` yields.
    """
    import torch

    starts = window_starts(len(tokens), batch_size, num_steps, sampling, seed=seed, epoch=epoch)
    if len(starts) == 0:
        raise ValueError(f"corpus of {len(tokens)} tokens is too short for one batch of "
                         f"{batch_size} x {num_steps} tokens")
    mine = torch.from_numpy(np.ascontiguousarray(starts[:, rank_rows(batch_size, rank, world_size)]))
    if tokens.device.type == "cuda":
        mine = mine.pin_memory()
    mine = mine.to(tokens.device, non_blocking=True)
    window = torch.arange(num_steps + 1, device=tokens.device)
    for i in range(start, len(starts)):
        w = tokens[mine[i][:, None] + window].long()  # (rows, num_steps + 1)
        yield w[:, :-1], w[:, 1:]


def token_tensor(ids: np.ndarray, vocab_size: int, device):
    """A split's token ids as a tensor on ``device`` in the smallest dtype that holds them
    (uint8 up to 256 tokens: a byte per token at char level)."""
    import torch

    dtype = np.uint8 if vocab_size <= 256 else np.int16 if vocab_size <= 2**15 else np.int32
    return torch.from_numpy(np.asarray(ids).astype(dtype)).to(device)  # narrowed on the host: less to copy
