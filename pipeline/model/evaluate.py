"""Perplexity of a language model on a token split, with every target counted.

A split of N tokens has N - 1 targets (each token predicted from the ones
before it). We score all of them, carrying the hidden state the whole way:

* the first ``batch_size * L`` inputs, ``L = (N - 1) // batch_size``, are cut
  into ``batch_size`` contiguous streams that run in parallel, ``num_steps``
  tokens at a time, the state carried from window to window (as d2l's
  sequential sampler does in training);
* the ``< batch_size`` inputs left over continue the last stream: they run as
  one more stream that starts from the last stream's final state, so they too
  are predicted from their true left context.

Each stream starts from the zero state, so the result depends on
``batch_size`` (more streams, more cold starts) and, through float rounding,
on ``num_steps``. Every figure the pipeline reports or compares (the trainer's
per-epoch validation and best-epoch choice, ``result.json``, the evaluate task,
MLflow's ``final_*_ppl`` and the gate) is computed with the one setting
``EVAL_BATCH_SIZE`` x ``EVAL_NUM_STEPS``, the defaults here, so the same model
on the same split gives the same number everywhere.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.model.cells import State
from pipeline.model.models import RNNLM, detach_state

# The one evaluation setting (see the module docstring). Changing it changes every
# stored figure's meaning: the registry records it in tags and re-evaluates on a mismatch.
EVAL_BATCH_SIZE = 32
EVAL_NUM_STEPS = 35

def perplexity(model: RNNLM, ids: np.ndarray, *, batch_size: int = EVAL_BATCH_SIZE,
               num_steps: int = EVAL_NUM_STEPS, device: torch.device | str | None = None,
               rank: int = 0, world_size: int = 1) -> float:
    """exp of the mean cross-entropy over all ``len(ids) - 1`` targets of ``ids``.

    A diverged model's cross-entropy can be finite but too large for exp: that is +inf.
    """
    return perplexity_from_loss(mean_cross_entropy(model, ids, batch_size=batch_size, num_steps=num_steps,
                                                   device=device, rank=rank, world_size=world_size))


def perplexity_from_loss(cross_entropy: float) -> float:
    """exp(cross-entropy in nats), +inf where exp overflows (a diverging but finite loss)."""
    return math.exp(cross_entropy) if cross_entropy < 700 else math.inf


def mean_cross_entropy(model: RNNLM, ids: np.ndarray, *, batch_size: int = EVAL_BATCH_SIZE,
                       num_steps: int = EVAL_NUM_STEPS, device: torch.device | str | None = None,
                       rank: int = 0, world_size: int = 1) -> float:
    """Mean next-token cross-entropy (nats) over all ``len(ids) - 1`` targets of ``ids``.

    Runs in eval mode under ``torch.no_grad`` and restores the model's mode.
    ``device`` defaults to the model's. With ``world_size > 1`` (an initialised
    ``torch.distributed`` group; every rank calls this) each rank scores its
    contiguous slice of the streams, the leftovers going with the last stream, and
    one all-reduce of per-stream float64 sums gives every rank the single-process figure.
    """
    ids = _check_ids(ids, model.vocab_size)
    if batch_size < 1 or num_steps < 1:
        raise ValueError(f"batch_size and num_steps must be at least 1, got {batch_size} and {num_steps}")
    device = device if device is not None else model.embedding.weight.device
    tokens = torch.from_numpy(ids).to(device)

    num_targets = len(tokens) - 1
    batch_size = min(batch_size, num_targets)  # at least one target per stream
    stream_len = num_targets // batch_size
    main = batch_size * stream_len
    first, last = batch_size * rank // world_size, batch_size * (rank + 1) // world_size
    # Slot i: stream i's summed cross-entropy; the extra last slot: the leftovers.
    sums = torch.zeros(batch_size + 1, dtype=torch.float64, device=device)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            X = tokens[:main].reshape(batch_size, stream_len)[first:last]
            Y = tokens[1 : main + 1].reshape(batch_size, stream_len)[first:last]
            if last > first:
                sums[first:last], state = _stream_cross_entropy(model, X, Y, None, num_steps)
                if main < num_targets and last == batch_size:  # leftovers continue the last stream
                    last_stream = tuple(s[:, -1:].contiguous() for s in state)
                    sums[-1:], _ = _stream_cross_entropy(model, tokens[main:-1][None], tokens[main + 1 :][None],
                                                         last_stream, num_steps)
    finally:
        model.train(was_training)
    if world_size > 1:  # every other rank's slots are zero here: the sum is exact
        import torch.distributed as dist

        dist.all_reduce(sums)
    return sums.sum().item() / num_targets  # the only host sync


def _stream_cross_entropy(model: RNNLM, X: torch.Tensor, Y: torch.Tensor, state: State | None,
                          num_steps: int) -> tuple[torch.Tensor, State]:
    """Per-stream summed cross-entropy (float64, on the device) of streams ``X`` -> ``Y`` (B, L)
    in windows of ``num_steps``, and the final state. No host sync."""
    totals = torch.zeros(X.shape[0], dtype=torch.float64, device=X.device)
    for start in range(0, X.shape[1], num_steps):
        x, y = X[:, start : start + num_steps], Y[:, start : start + num_steps]
        ce, state = model(x, state, targets=y, reduction="none")
        state = detach_state(state)
        totals += ce.reshape(x.shape).double().sum(dim=1)
    return totals, state


def _check_ids(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D array of token ids, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must hold integer token ids, got dtype {ids.dtype}")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score a next-token prediction, got {len(ids)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got range [{low}, {high}]")
    return ids.astype(np.int64)
