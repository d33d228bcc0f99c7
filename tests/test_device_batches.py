"""Batches sliced on the device are the sampler's batches (pipeline.data.sampling.device_batches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.sampling import batches, device_batches, token_tensor


@pytest.mark.parametrize("sampling", ["random", "sequential"])
@pytest.mark.parametrize("rank,world_size,start", [(0, 1, 0), (1, 2, 3), (0, 4, 1)])
def test_device_batches_equal_host_batches(sampling, rank, world_size, start):
    corpus = np.random.default_rng(0).integers(0, 28, 5_003).astype(np.int32)
    tokens = token_tensor(corpus, 28, torch.device("cpu"))
    assert tokens.dtype == torch.uint8  # a byte per token at char level
    kwargs = dict(seed=7, epoch=2, rank=rank, world_size=world_size, start=start)
    host = list(batches(corpus, 8, 13, sampling, **kwargs))
    dev = list(device_batches(tokens, 8, 13, sampling, **kwargs))
    assert len(host) == len(dev) > 0
    for (hx, hy), (dx, dy) in zip(host, dev):
        assert dx.dtype == dy.dtype == torch.int64
        assert np.array_equal(hx, dx.numpy()) and np.array_equal(hy, dy.numpy())


def test_token_tensor_is_the_smallest_exact_dtype():
    ids = np.array([0, 5, 40_000])
    assert token_tensor(ids, 40_001, torch.device("cpu")).dtype == torch.int32
    assert token_tensor(ids[:2], 300, torch.device("cpu")).dtype == torch.int16
    assert token_tensor(ids, 40_001, torch.device("cpu")).tolist() == [0, 5, 40_000]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_batches_on_cuda():
    corpus = np.random.default_rng(0).integers(0, 28, 5_003)
    tokens = token_tensor(corpus, 28, torch.device("cuda"))
    for (hx, _), (dx, _) in zip(batches(corpus, 8, 13, "random", seed=1, epoch=0),
                                device_batches(tokens, 8, 13, "random", seed=1, epoch=0)):
        assert dx.is_cuda and np.array_equal(hx, dx.cpu().numpy())


@pytest.mark.parametrize("variable_length", [False, True])
def test_device_batches_across_gather_chunks(variable_length):
    """More batches than one gather chunk, from a start inside the second chunk; variable lengths
    (AWD-LSTM's BPTT) are gathered one batch at a time."""
    from pipeline.data.sampling import GATHER_STEPS

    corpus = np.random.default_rng(1).integers(0, 28, 8 * 13 * (3 * GATHER_STEPS)).astype(np.int32)
    tokens = token_tensor(corpus, 28, torch.device("cpu"))
    kwargs = dict(seed=3, epoch=0, start=GATHER_STEPS + 2, variable_length=variable_length)
    host = list(batches(corpus, 8, 13, "sequential", **kwargs))
    dev = list(device_batches(tokens, 8, 13, "sequential", **kwargs))
    assert len(host) == len(dev) > GATHER_STEPS // 2
    assert (len({x.shape[1] for x, _ in host}) > 1) == variable_length
    for (hx, hy), (dx, dy) in zip(host, dev, strict=True):
        assert np.array_equal(hx, dx.numpy()) and np.array_equal(hy, dy.numpy())
