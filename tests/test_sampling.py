"""d2l minibatch sampling (ch. 8.3) on the toy sequence, plus determinism and rank slicing.

The corpus is ``np.arange``, so every token's value is its position.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.sampling import batches, num_batches, rank_rows

TOY = np.arange(35)
B, T = 2, 5
MODES = ["random", "sequential"]


def epoch(mode, corpus=TOY, batch_size=B, num_steps=T, seed=0, e=0, **kw):
    return list(batches(corpus, batch_size, num_steps, mode, seed=seed, epoch=e, **kw))


def offset_of(xs: list[tuple[np.ndarray, np.ndarray]], num_steps: int = T) -> int:
    starts = np.concatenate([x[:, 0] for x, _ in xs])
    assert len(set((starts % num_steps).tolist())) == 1  # every window sits on the same grid
    return int(starts[0] % num_steps)


@pytest.mark.parametrize("mode", MODES)
def test_toy_shapes_and_shift(mode):
    assert num_batches(35, B, T, mode) == 3
    for e in range(20):
        out = epoch(mode, e=e)
        assert len(out) == 3
        for x, y in out:
            assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int64
            assert np.array_equal(y, x + 1)  # Y is X shifted by one token
            assert np.array_equal(x, x[:, :1] + np.arange(T))  # a window is T consecutive tokens
            assert y.max() <= 34


@pytest.mark.parametrize("mode", MODES)
def test_offsets_cover_the_range(mode):
    offsets = [offset_of(epoch(mode, e=e)) for e in range(60)]
    assert set(offsets) == set(range(T))  # every offset in [0, num_steps) occurs, nothing else


def test_sequential_rows_continue():
    for e in range(10):
        out = epoch("sequential", e=e)
        off = offset_of(out)
        stream = 3 * T  # n batches x num_steps tokens per row
        assert out[0][0][:, 0].tolist() == [off, off + stream]  # row r is stream r
        for (x0, _), (x1, _) in zip(out, out[1:]):
            assert np.array_equal(x1[:, 0], x0[:, -1] + 1)  # batch i+1 continues batch i, row by row
        rows = np.concatenate([x for x, _ in out], axis=1)
        assert np.array_equal(rows, off + np.arange(B * stream).reshape(B, stream))


def test_sequential_d2l_example():
    # The first batch: row 0 starts at the offset, row 1 one stream (3 batches x 5 tokens) later.
    out = [(x.tolist(), y.tolist()) for x, y in epoch("sequential", seed=0, e=0)]
    off = offset_of(epoch("sequential", seed=0, e=0))
    assert out[0] == (
        [list(range(off, off + 5)), list(range(off + 15, off + 20))],
        [list(range(off + 1, off + 6)), list(range(off + 16, off + 21))],
    )


def test_random_windows_do_not_overlap():
    for e in range(30):
        out = epoch("random", e=e)
        off = offset_of(out)
        starts = np.concatenate([x[:, 0] for x, _ in out]).tolist()
        assert len(starts) == 3 * B == len(set(starts))
        assert all(s >= off and (s - off) % T == 0 and s + T + 1 <= 35 for s in starts)
        covered = np.concatenate([x.ravel() for x, _ in out])
        assert len(set(covered.tolist())) == covered.size  # no token in two windows


def test_random_windows_are_shuffled():
    corpus = np.arange(2_000)
    out = epoch("random", corpus, batch_size=4, num_steps=7)
    starts = np.concatenate([x[:, 0] for x, _ in out])
    assert len(out) == num_batches(2_000, 4, 7, "random") == 71
    assert not np.array_equal(starts, np.sort(starts))
    # all but at most one of the windows after the offset are used
    assert len(starts) >= (2_000 - offset_of(out, 7) - 1) // 7 - 4


@pytest.mark.parametrize("mode", MODES)
def test_determinism(mode):
    corpus = np.arange(1_000)

    def flat(**kw):
        return np.stack([x for x, _ in epoch(mode, corpus, batch_size=4, num_steps=6, **kw)])

    assert np.array_equal(flat(seed=3, e=1), flat(seed=3, e=1))
    outputs = {flat(seed=3, e=e).tobytes() for e in range(12)}
    if mode == "random":
        assert not np.array_equal(flat(seed=3, e=1), flat(seed=3, e=2))
        assert not np.array_equal(flat(seed=3, e=1), flat(seed=4, e=1))
        assert len(outputs) == 12  # every epoch its own shuffle
    else:
        # sequential batches are fixed by the epoch's offset alone: 6 possible epochs
        offsets = {offset_of(epoch(mode, corpus, 4, 6, seed=3, e=e), 6) for e in range(12)}
        assert len(outputs) == len(offsets) >= 3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("corpus, batch_size, num_steps", [(TOY, 2, 5), (np.arange(500), 6, 4)])
def test_rank_slices(mode, corpus, batch_size, num_steps):
    world = 2
    for e in range(5):
        whole = epoch(mode, corpus, batch_size, num_steps, seed=1, e=e)
        parts = [epoch(mode, corpus, batch_size, num_steps, seed=1, e=e, rank=r, world_size=world) for r in range(world)]
        assert all(len(p) == len(whole) for p in parts)
        for i, (x, y) in enumerate(whole):
            xs = [p[i][0] for p in parts]
            assert all(part.shape == (batch_size // world, num_steps) for part in xs)
            assert np.array_equal(np.concatenate(xs), x)  # union of rank rows == the full batch
            assert np.array_equal(np.concatenate([p[i][1] for p in parts]), y)
            assert not set(xs[0].ravel().tolist()) & set(xs[1].ravel().tolist())  # disjoint rows
    assert rank_rows(6, 1, 2) == slice(3, 6)


@pytest.mark.parametrize("mode", MODES)
def test_num_batches_constant_across_epochs(mode):
    corpus = np.arange(1_003)
    n = num_batches(len(corpus), 8, 9, mode)
    assert n == (1_003 - 9) // 9 // 8 == 13
    assert {len(epoch(mode, corpus, 8, 9, e=e)) for e in range(40)} == {n}


@pytest.mark.parametrize("mode", MODES)
def test_resume_mid_epoch(mode):
    corpus = np.arange(300)
    full = epoch(mode, corpus, 4, 5, seed=7, e=2)
    rest = epoch(mode, corpus, 4, 5, seed=7, e=2, start=3)
    assert len(rest) == len(full) - 3
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(full[3:], rest))


@pytest.mark.parametrize("mode", MODES)
def test_errors(mode):
    with pytest.raises(ValueError, match="too short"):
        epoch(mode, np.arange(10), batch_size=2, num_steps=5)  # 10 - 4 - 1 = 5 usable < 2 x 5
    assert len(epoch(mode, np.arange(15), batch_size=2, num_steps=5)) == 1  # just long enough
    with pytest.raises(ValueError, match="not divisible by world size 2"):
        epoch(mode, batch_size=3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="outside world size"):
        epoch(mode, rank=2, world_size=2)
    with pytest.raises(ValueError, match="unknown sampling"):
        epoch("shuffled")


# ------------------------------------------------------------------- variable BPTT


def variable(corpus, batch_size=4, num_steps=20, seed=1, e=0, **kw):
    return list(batches(corpus, batch_size, num_steps, "sequential", seed=seed, epoch=e, variable_length=True, **kw))


def test_variable_lengths_keep_the_epoch_and_the_streams():
    corpus = np.arange(20_000)
    n = num_batches(len(corpus), 4, 20, "sequential")
    lengths_seen = set()
    for e in range(10):
        out = variable(corpus, e=e)
        assert len(out) == n  # a step count still identifies a position
        lengths = [x.shape[1] for x, _ in out]
        lengths_seen.update(lengths)
        assert min(lengths) >= 5 and sum(lengths) <= n * 20
        for (x0, _), (x1, _) in zip(out, out[1:]):
            assert np.array_equal(x1[:, 0], x0[:, -1] + 1)  # rows still continue batch to batch
        for x, y in out:
            assert np.array_equal(y, x + 1)
        fixed = list(batches(corpus, 4, 20, "sequential", seed=1, epoch=e))
        assert np.array_equal(out[0][0][:, 0], fixed[0][0][:, 0])  # same offset and streams as fixed length
    assert len(lengths_seen) > 10 and max(lengths_seen) > 20 and min(lengths_seen) < 15


def test_variable_lengths_are_seeded_resumable_and_shared_by_ranks():
    corpus = np.arange(5_000)
    full = variable(corpus, seed=3, e=2)
    assert [x.shape[1] for x, _ in full] == [x.shape[1] for x, _ in variable(corpus, seed=3, e=2)]
    assert [x.shape[1] for x, _ in full] != [x.shape[1] for x, _ in variable(corpus, seed=3, e=3)]
    rest = variable(corpus, seed=3, e=2, start=5)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(full[5:], rest)) and len(rest) == len(full) - 5
    parts = [variable(corpus, seed=3, e=2, rank=r, world_size=2) for r in range(2)]
    for i, (x, _) in enumerate(full):
        assert np.array_equal(np.concatenate([p[i][0] for p in parts]), x)


def test_bptt_lengths_fit_the_stream_even_when_the_draws_overrun():
    from pipeline.data.sampling import bptt_lengths

    for seed in range(300):  # some of these overrun n * num_steps before clipping
        for num_steps in (3, 5, 12, 64):
            lengths = bptt_lengths(np.random.default_rng(seed), 40, num_steps)
            assert len(lengths) == 40 and lengths.min() >= min(5, num_steps)
            assert lengths.sum() <= 40 * num_steps


def test_variable_lengths_need_sequential_sampling():
    with pytest.raises(ValueError, match="sequential"):
        list(batches(np.arange(500), 2, 5, "random", seed=0, epoch=0, variable_length=True))


def test_variable_lengths_on_the_device_equal_the_host_batches():
    import torch

    from pipeline.data.sampling import device_batches

    corpus = np.arange(3_000)
    kwargs = dict(seed=5, epoch=1, rank=1, world_size=2, start=2, variable_length=True)
    host = list(batches(corpus, 4, 20, "sequential", **kwargs))
    device = list(device_batches(torch.from_numpy(corpus), 4, 20, "sequential", **kwargs))
    assert len(host) == len(device) and len({x.shape[1] for x, _ in host}) > 1
    for (hx, hy), (dx, dy) in zip(host, device):
        assert np.array_equal(hx, dx.numpy()) and np.array_equal(hy, dy.numpy())
