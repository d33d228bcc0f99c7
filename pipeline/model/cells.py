"""The scratch recurrent cells: d2l's equations (ch. 9-10) written out step by step.

The ``scratch`` backend of ``pipeline.model.models.RNNLM`` runs its stack with these
(``ScratchRecurrent``) as readable reference implementations. They name and shape their
parameters exactly as torch does (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
``bias_hh_l0``, gates stacked in torch's order), so both backends have the same
``state_dict``: a model trained with one loads into the other and gives the same outputs.
``run_layers`` runs either backend's stack one layer at a time (what weight drop and
locked dropout between layers need).

The recurrent state is always a tuple of ``(num_layers, batch, hidden)`` tensors:
``(h,)`` for rnn/gru, ``(h, c)`` for lstm.

Only stdlib and torch are imported: this file ships inside self-contained MLflow models.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

State = tuple[torch.Tensor, ...]

NUM_GATES = {"rnn": 1, "gru": 3, "lstm": 4}


# Each cell maps one time step to the new state. Its input part, W_ih x_t + b_ih, does not
# depend on the state, so ScratchRecurrent computes it for all time steps in one matmul
# (``xw``, (B, gates*H)); the cell adds the recurrent part W_hh h + b_hh. Weights are
# torch's stacked ones: w_hh (gates*H, H), b_hh (gates*H,). Where b_hh only adds to the
# input part (rnn, lstm), it is folded into ``xw`` too and the cell gets ``b_hh=None``.


def rnn_tanh_cell(xw, state, w_hh, b_hh=None):
    """h' = tanh(W_ih x + b_ih + W_hh h + b_hh)   (d2l 9.4)"""
    (h,) = state
    return (torch.tanh(torch.addmm(xw, h, w_hh.T)),)


def rnn_relu_cell(xw, state, w_hh, b_hh=None):
    """h' = relu(W_ih x + b_ih + W_hh h + b_hh)"""
    (h,) = state
    return (torch.relu(torch.addmm(xw, h, w_hh.T)),)


def gru_cell(xw, state, w_hh, b_hh):
    """GRU (d2l 10.2) in torch's gate order r, z, n.

    d2l applies the reset gate before the hidden matmul, W_hn (r * h); cuDNN and
    torch apply it after, r * (W_hn h + b_hn). We follow torch so that the two
    backends are interchangeable.
    """
    (h,) = state
    i_r, i_z, i_n = xw.chunk(3, dim=1)
    h_r, h_z, h_n = torch.addmm(b_hh, h, w_hh.T).chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)  # reset gate
    z = torch.sigmoid(i_z + h_z)  # update gate
    n = torch.tanh(i_n + r * h_n)  # candidate state
    return (torch.lerp(n, h, z),)  # (1 - z) * n + z * h


def lstm_cell(xw, state, w_hh, b_hh=None):
    """LSTM (d2l 10.1) in torch's gate order i, f, g, o."""
    h, c = state
    i, f, g, o = torch.addmm(xw, h, w_hh.T).chunk(4, dim=1)
    i = torch.sigmoid(i)  # input gate
    f = torch.sigmoid(f)  # forget gate
    g = torch.tanh(g)  # candidate memory
    o = torch.sigmoid(o)  # output gate
    c = f * c + i * g
    return (o * torch.tanh(c), c)


CELLS = {"rnn_tanh": rnn_tanh_cell, "rnn_relu": rnn_relu_cell, "gru": gru_cell, "lstm": lstm_cell}
WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

Weights = tuple[torch.Tensor, ...]  # one layer's (w_ih, w_hh, b_ih, b_hh)
LayerRunner = Callable[[int, torch.Tensor, State, Weights], tuple[torch.Tensor, State]]


def layer_weights(rnn: nn.Module, layer: int) -> Weights:
    """Layer ``layer``'s parameters of a torch or scratch stack (same names in both)."""
    return tuple(getattr(rnn, f"{name}_l{layer}") for name in WEIGHT_NAMES)


def run_layers(run_layer: LayerRunner, x: torch.Tensor, state: State, num_layers: int,
               weights: Callable[[int], Weights],
               between: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, State]:
    """A recurrent stack, one layer at a time: ``between`` transforms the input of layers 1..L-1.

    ``x`` is time-major (T, B, in) and ``state`` a tuple of (L, B, H) tensors; returns the
    last layer's outputs (T, B, H) and the new state. ``between`` runs before ``weights``
    for each layer: that order fixes the order of the random draws, the same for both backends.
    """
    final = []  # per layer, the state after the last time step
    for layer in range(num_layers):
        if layer > 0:
            x = between(x)
        x, s = run_layer(layer, x, tuple(part[layer] for part in state), weights(layer))
        final.append(s)
    return x, tuple(torch.stack(parts) for parts in zip(*final))


class ScratchRecurrent(nn.Module):
    """A multi-layer recurrent stack that loops over time steps with the cells above.

    Called like ``nn.RNN`` (time-major): ``forward(x (T, B, in), hx)`` with
    ``hx`` a ``(L, B, H)`` tensor, or ``(h, c)`` for lstm; returns the last
    layer's outputs ``(T, B, H)`` and the final ``hx``. Dropout is applied to the
    input of every layer but the first, as torch does.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int,
                 dropout: float = 0.0, nonlinearity: str = "tanh"):
        super().__init__()
        self.cell = cell
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = dropout
        self.step = CELLS[f"rnn_{nonlinearity}" if cell == "rnn" else cell]
        gates = NUM_GATES[cell] * hidden_size
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(gates, in_size)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(gates, hidden_size)))
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(gates)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(gates)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch's own default for recurrent layers: every parameter U(-1/sqrt(H), 1/sqrt(H)).
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def run_layer(self, layer: int, x: torch.Tensor, s: State, weights: Weights) -> tuple[torch.Tensor, State]:
        """One layer over all time steps: inputs (T, B, in), state parts (B, H)."""
        w_ih, w_hh, b_ih, b_hh = weights
        folded = self.cell != "gru"  # gru's b_hn sits inside the reset gate's product
        bias, b_hh = (b_ih + b_hh, None) if folded else (b_ih, b_hh)
        xw = torch.addmm(bias, x.reshape(-1, x.shape[-1]), w_ih.T).reshape(x.shape[0], x.shape[1], -1)
        outputs = []
        # Unbind rather than index: indexing step t would give each step's gradient the
        # size of the whole sequence.
        for xw_t in xw.unbind(0):
            s = self.step(xw_t, s, w_hh, b_hh)
            outputs.append(s[0])
        return torch.stack(outputs), s

    def forward(self, x: torch.Tensor, hx):
        state = hx if self.cell == "lstm" else (hx,)
        x, new_state = run_layers(self.run_layer, x, state, self.num_layers,
                                  lambda layer: layer_weights(self, layer),
                                  lambda x: F.dropout(x, self.dropout, self.training))
        return x, (new_state if self.cell == "lstm" else new_state[0])
