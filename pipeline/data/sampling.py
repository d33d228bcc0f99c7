"""Minibatches of (X, Y) token windows, with the semantics of d2l ch. 8.3.

Both samplers start at a random offset in ``[0, num_steps)`` so every epoch sees
different window boundaries, and ``Y`` is ``X`` shifted by one token.

* ``random``: the corpus is cut into non-overlapping windows of ``num_steps``
  tokens, shuffled, and grouped into batches. Neighbouring windows of a batch are
  unrelated, so the hidden state is reset for every batch.
* ``sequential``: the corpus is cut into ``batch_size`` parallel streams; batch
  ``i+1`` continues batch ``i`` row by row, so the hidden state carries over
  (detached) from one batch to the next.

Variable BPTT (AWD-LSTM, sequential only): each batch's length is drawn around
``num_steps`` from the same seeded per-epoch stream (``bptt_lengths``); the epoch keeps
its ``num_batches`` batches, so a step count still identifies a position.

DDP: all ranks draw the same global batch from the same seeded generator and
each keeps its own contiguous block of ``batch_size // world_size`` rows. Rank
``r`` therefore always owns the same streams in sequential mode, and the ranks
together see exactly what one process with the full batch sees.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

Sampling = Literal["random", "sequential"]

BPTT_STD = 5.0  # AWD-LSTM: length ~ N(num_steps, 5), or N(num_steps / 2, 5) with probability
BPTT_HALF_P = 0.05  # 0.05, and at least 5 tokens
BPTT_MIN = 5
RELEASE_EVERY = 256  # batches: a memory-mapped corpus's pages leave the rank's resident set this often


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
    variable_length: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(X, Y)`` int64 arrays of shape ``(batch_size // world_size, num_steps)``.

    ``start`` skips the first ``start`` batches of the epoch (resuming mid-epoch).
    ``variable_length`` (sequential only): batch ``i`` has ``bptt_lengths(...)[i]`` columns.
    """
    from pipeline.data.split_cache import release

    plan = EpochPlan.draw(len(corpus), batch_size, num_steps, sampling, seed=seed, epoch=epoch,
                          variable_length=variable_length)
    rows, lengths = rank_rows(batch_size, rank, world_size), plan.lengths
    for i in range(start, plan.num_batches):
        index = plan.starts(i, rows)[:, None] + np.arange(lengths[i])  # (rows, length): only this rank's tokens
        yield corpus[index].astype(np.int64), corpus[index + 1].astype(np.int64)
        if i % RELEASE_EVERY == RELEASE_EVERY - 1:  # a mapped corpus: resident memory stays flat
            release(corpus)


def epoch_windows(num_tokens: int, batch_size: int, num_steps: int, sampling: Sampling, *,
                  seed: int, epoch: int, variable_length: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Where every window of the epoch starts, ``(num_batches, batch_size)``, and each batch's
    length, ``(num_batches,)``: row ``b`` of batch ``i`` is ``corpus[s : s + lengths[i]]`` with
    ``s = starts[i, b]`` (``Y`` from ``s + 1``)."""
    plan = EpochPlan.draw(num_tokens, batch_size, num_steps, sampling, seed=seed, epoch=epoch,
                          variable_length=variable_length)
    rows = np.arange(batch_size)
    return np.stack([plan.starts(i, rows) for i in range(plan.num_batches)]), plan.lengths


class EpochPlan:
    """One epoch's windows, drawn by one seeded generator per epoch: the offset, then the
    shuffle (random) or the variable lengths (sequential). ``starts(i, rows)`` is batch ``i``'s
    window starts for ``rows``, computed when asked: under sequential sampling the epoch's
    whole (num_batches, batch_size) table is never built (8 bytes a window: 45 MB for a
    200 MB char corpus, for each rank)."""

    def __init__(self, offset: int, lengths: np.ndarray, stream_len: int, shuffled: np.ndarray | None):
        self.offset, self.lengths, self.stream_len, self.shuffled = offset, lengths, stream_len, shuffled
        self.column = np.cumsum(lengths) - lengths  # sequential: where batch i starts within every stream

    @property
    def num_batches(self) -> int:
        return len(self.lengths)

    @classmethod
    def draw(cls, num_tokens: int, batch_size: int, num_steps: int, sampling: Sampling, *,
             seed: int, epoch: int, variable_length: bool = False) -> EpochPlan:
        n = num_batches(num_tokens, batch_size, num_steps, sampling)
        if n == 0:
            raise ValueError(f"corpus of {num_tokens} tokens is too short for one batch of "
                             f"{batch_size} x {num_steps} tokens")
        if sampling not in ("random", "sequential"):
            raise ValueError(f"unknown sampling {sampling!r}: expected 'random' or 'sequential'")
        if variable_length and sampling != "sequential":
            raise ValueError("variable_length needs sequential sampling")
        rng = epoch_rng(seed, epoch)
        offset = int(rng.integers(0, num_steps))
        if sampling == "random":  # as d2l: shuffle every window that fits after the offset, use n batches' worth
            num_windows = (num_tokens - offset - 1) // num_steps
            shuffled = offset + num_steps * rng.permutation(num_windows)[: n * batch_size]
            return cls(offset, np.full(n, num_steps), 0, shuffled.reshape(n, batch_size))
        # Stream b is the b-th contiguous stretch of n * num_steps tokens; variable lengths
        # cover a prefix of each, so the streams are those of fixed lengths.
        lengths = bptt_lengths(rng, n, num_steps) if variable_length else np.full(n, num_steps)
        return cls(offset, lengths, n * num_steps, None)

    def starts(self, i: int, rows: slice | np.ndarray) -> np.ndarray:
        """Batch ``i``'s window starts for ``rows`` (a slice or indices of the global batch)."""
        if self.shuffled is not None:
            return self.shuffled[i, rows]
        b = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        return self.offset + self.stream_len * b + self.column[i]


def bptt_lengths(rng: np.random.Generator, n: int, num_steps: int) -> np.ndarray:
    """``n`` window lengths around ``num_steps`` (AWD-LSTM) that fit in ``n * num_steps`` tokens.

    Each is ``N(num_steps, 5)``, or ``N(num_steps / 2, 5)`` with probability 0.05, at least
    ``min(5, num_steps)``. Their mean is a little under ``num_steps``; in the rare epoch whose
    draws would overrun the stream, the last windows are shortened (never below the minimum).
    """
    low = min(BPTT_MIN, num_steps)
    centre = np.where(rng.random(n) < BPTT_HALF_P, num_steps / 2, num_steps)
    lengths = np.maximum(low, rng.normal(centre, BPTT_STD).astype(np.int64))
    # Batch i may end no later than room[i], which leaves `low` tokens for each later batch.
    # Once a cumulative end passes its room it stays past (lengths >= low = the room's steps),
    # so clipping the ends is the same as shortening windows one by one.
    room = n * num_steps - low * np.arange(n - 1, -1, -1)
    return np.diff(np.minimum(np.cumsum(lengths), room), prepend=0)


# ------------------------------------------------------------------ on the device


def device_batches(tokens, batch_size: int, num_steps: int, sampling: Sampling, *, seed: int, epoch: int,
                   rank: int = 0, world_size: int = 1, start: int = 0, variable_length: bool = False,
                   device=None):
    """``batches`` over ``tokens``, a 1-D integer tensor that already lives on the device
    (or in pinned host memory, ``token_tensor``: then each batch is copied to ``device``).

    The epoch's window starts go to the device once; batches are then gathered there, a chunk
    of them at a time, with no copy from the host per step (a pageable host-to-device copy
    waits for the device). Yields int64 ``(X, Y)`` tensors, the same values ``batches`` yields.
    """
    import torch

    starts, lengths = epoch_windows(len(tokens), batch_size, num_steps, sampling, seed=seed, epoch=epoch,
                                    variable_length=variable_length)
    mine = torch.from_numpy(np.ascontiguousarray(starts[:, rank_rows(batch_size, rank, world_size)]))
    if tokens.device.type == "cuda":
        mine = mine.pin_memory()
    mine = mine.to(tokens.device, non_blocking=True)
    window = torch.arange(int(lengths.max()) + 1, device=tokens.device)
    # Windows of one length are gathered GATHER_STEPS batches at a time (a few kernels per chunk,
    # not per step: a small model's GPU step is launch-bound); variable lengths one at a time.
    chunk = GATHER_STEPS if len(lengths) and (lengths == lengths[0]).all() else 1
    for c in range(start, len(starts), chunk):
        rows = mine[c:c + chunk]
        w = tokens[rows[:, :, None] + window[: lengths[c] + 1]]  # (chunk, rows, length + 1)
        if device is not None and w.device != torch.device(device):  # split in pinned host memory
            w = w.pin_memory().to(device, non_blocking=True)
        w = w.long()
        for batch in w:
            yield batch[:, :-1], batch[:, 1:]


GATHER_STEPS = 32  # device_batches' chunk: 32 x rows x (num_steps + 1) int64, 300 KB at d2l's 32 x 35
DEVICE_HEADROOM = 0.5  # the split goes to the GPU only if it takes at most this share of its free memory
COPY_CHUNK = 1 << 24  # tokens narrowed and copied at a time: host memory stays bounded


def token_tensor(ids: np.ndarray, vocab_size: int, device):
    """A split's token ids as a tensor in the smallest dtype that holds them (uint8 up to 256
    tokens: a byte per token at char level): on ``device`` when it fits there (a CUDA device's
    free memory, with headroom for training), else in pinned host memory, from which
    ``device_batches`` gathers each batch and copies it over. Copied a chunk at a time, so a
    memory-mapped split is never a second whole copy on the host."""
    import torch

    from pipeline.data.split_cache import release

    dtype = np.uint8 if vocab_size <= 256 else np.int16 if vocab_size <= 2**15 else np.int32
    nbytes = len(ids) * np.dtype(dtype).itemsize
    device = torch.device(device)
    where = device
    if device.type == "cuda" and nbytes > DEVICE_HEADROOM * torch.cuda.mem_get_info(device)[0]:
        where = torch.device("cpu")
    out = torch.empty(len(ids), dtype=getattr(torch, np.dtype(dtype).name), device=where,
                      pin_memory=where.type == "cpu" and device.type == "cuda")
    for start in range(0, len(ids), COPY_CHUNK):
        part = np.ascontiguousarray(ids[start: start + COPY_CHUNK], dtype=dtype)  # narrowed on the host
        out[start: start + len(part)].copy_(torch.from_numpy(part))
        release(ids)
    if device.type == "cuda":
        log.info("training split (%.1f MB) %s", nbytes / 2**20,
                 "on the device" if where == device else "in pinned host memory: too big for the device")
    return out
