"""Validation perplexity sharded over 2 gloo ranks equals the single-process figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import ModelConfig
from pipeline.model.evaluate import mean_cross_entropy
from pipeline.model.models import build_model

V = 17


def model(softmax: str):
    torch.manual_seed(0)
    extra = {"softmax": "adaptive", "adaptive_cutoffs": (4, 9)} if softmax == "adaptive" else {}
    return build_model(ModelConfig(cell="lstm", hidden_size=16, embed_size=8, num_layers=2, init="uniform",
                                   init_scale=0.4, **extra), V)


def ids() -> np.ndarray:
    return np.random.default_rng(3).integers(0, V, 1_237)  # leftovers: 1236 targets % 10 streams != 0


def _rank(rank: int, init_file: str, softmax: str, batch_size: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out[rank] = mean_cross_entropy(model(softmax), ids(), batch_size=batch_size, num_steps=7,
                                       rank=rank, world_size=2)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("softmax,batch_size", [("full", 10), ("adaptive", 10), ("full", 1)])
def test_two_gloo_ranks_score_what_one_process_does(tmp_path, softmax, batch_size):
    torch.set_num_threads(1)
    single = mean_cross_entropy(model(softmax), ids(), batch_size=batch_size, num_steps=7)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(str(tmp_path / "init"), softmax, batch_size, out), nprocs=2, join=True)
        results = dict(out)
    # Every rank gets the total, bit for bit: per-stream float64 sums, added in one order (batch 1:
    # rank 0 has no stream at all and still joins the all-reduce).
    assert results[0] == results[1] == single
