"""The regularisers of AWD-LSTM (Merity et al. 2017, "Regularizing and Optimizing LSTM Language Models").

* ``locked_dropout``: variational dropout (Gal & Ghahramani 2016): one mask per sequence,
  shared by every time step, so a dropped unit stays dropped for the whole window.
* ``embedding_dropout``: whole words dropped: every occurrence of a dropped word in the
  batch embeds to zero.
* ``drop_weight``: DropConnect on a weight matrix, one mask per batch (all time steps).
* ``activation_penalty``: AR and TAR, L2 penalties on the last layer's activations.

Every mask comes from torch's global RNG (the trainer reseeds it per (seed, epoch, step,
rank)), so runs, resumed runs and DDP ranks draw the same masks. In eval mode, or at
probability 0, each function returns its input unchanged and draws nothing.

Only torch is imported: this file ships inside self-contained MLflow models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def keep_mask(shape: tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor:
    """Bernoulli(1 - p) / (1 - p): the kept entries are scaled so the expectation is unchanged."""
    return like.new_empty(shape).bernoulli_(1 - p).div_(1 - p)


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout of a time-major (time, batch, features) tensor with one mask per sequence,
    shared across time. (The (1, B, F) mask draws the same numbers as a batch-major (B, 1, F) one.)"""
    if not training or p == 0:
        return x
    return x * keep_mask((1, x.shape[1], x.shape[2]), p, x)


def embedding_dropout(embedding: torch.nn.Embedding, ids: torch.Tensor, p: float,
                      training: bool) -> torch.Tensor:
    """``embedding(ids)`` with whole vocabulary rows dropped (one mask per batch).

    The same as looking up in ``weight * mask`` (AWD-LSTM's formulation), but only the
    rows in the batch are multiplied.
    """
    embedded = embedding(ids)
    if not training or p == 0:
        return embedded
    mask = keep_mask((embedding.num_embeddings, 1), p, embedding.weight)
    return embedded * mask[ids]


def drop_weight(weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """DropConnect: a copy of ``weight`` with entries zeroed (the parameter itself is untouched)."""
    if not training or p == 0:
        return weight
    return F.dropout(weight, p, training=True)


def activation_penalty(raw: torch.Tensor, dropped: torch.Tensor, ar: float, tar: float) -> torch.Tensor:
    """AR on the last layer's dropped output plus TAR on its raw output, both (batch, time, hidden).

    AR (``ar * mean(h^2)``) keeps activations small; TAR (``tar * mean((h_t - h_{t-1})^2)``)
    keeps them from changing fast between steps. Zero (a tensor) when both weights are 0.
    """
    penalty = raw.new_zeros(())
    if ar:
        penalty = penalty + ar * dropped.pow(2).mean()
    if tar and raw.shape[1] > 1:
        penalty = penalty + tar * (raw[:, 1:] - raw[:, :-1]).pow(2).mean()
    return penalty
