"""The recurrent language model of d2l ch. 8-9: embedding -> recurrent stack -> vocabulary projection.

Two interchangeable backends run the recurrent stack:

* ``torch``: ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (cuDNN on a GPU).
* ``scratch``: the cells written out step by step as readable reference
  implementations of the book's equations.

The scratch stack names and shapes its parameters exactly as torch does
(``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, gates stacked
in torch's order), so the two backends have the same ``state_dict``: a model
trained with one loads into the other and gives the same outputs.

Regularisation (``pipeline.regularization``) acts in train mode only. Weight drop and
locked dropout between layers act inside the stack, so then both backends run it layer by
layer (``run_layers``), drawing the masks in the same order: they agree in training too.
The torch backend runs each layer through ``torch.func.functional_call`` on a
parameterless (meta) single-layer twin: the parameters stay where they are (same
``state_dict``), and torch re-flattens the swapped-in weights for cuDNN itself.

The recurrent state is always a tuple of ``(num_layers, batch, hidden)`` tensors:
``(h,)`` for rnn/gru, ``(h, c)`` for lstm.

Only stdlib, torch, ``pipeline.config`` and ``pipeline.regularization`` are imported:
this file ships inside self-contained MLflow models.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pipeline.config import ModelConfig
from pipeline.regularization import drop_weight, embedding_dropout, locked_dropout

State = tuple[torch.Tensor, ...]

NUM_GATES = {"rnn": 1, "gru": 3, "lstm": 4}


# ------------------------------------------------------------------ scratch cells
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

    ``state`` is a tuple of (L, B, H) tensors; returns the last layer's outputs (B, T, H)
    and the new state. ``between`` runs before ``weights`` for each layer: that order
    fixes the order of the random draws, the same for both backends.
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

    Called like ``nn.RNN(batch_first=True)``: ``forward(x (B, T, in), hx)`` with
    ``hx`` a ``(L, B, H)`` tensor, or ``(h, c)`` for lstm; returns the last
    layer's outputs ``(B, T, H)`` and the final ``hx``. Dropout is applied to the
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
        """One layer over all time steps: inputs (B, T, in), state parts (B, H)."""
        w_ih, w_hh, b_ih, b_hh = weights
        # Time-major, and unbind rather than index: indexing step t would give each
        # step's gradient the size of the whole sequence.
        steps = x.transpose(0, 1).reshape(-1, x.shape[-1])
        folded = self.cell != "gru"  # gru's b_hn sits inside the reset gate's product
        bias, b_hh = (b_ih + b_hh, None) if folded else (b_ih, b_hh)
        xw = torch.addmm(bias, steps, w_ih.T).reshape(x.shape[1], x.shape[0], -1)
        outputs = []
        for xw_t in xw.unbind(0):
            s = self.step(xw_t, s, w_hh, b_hh)
            outputs.append(s[0])
        return torch.stack(outputs, dim=1), s

    def forward(self, x: torch.Tensor, hx):
        state = hx if self.cell == "lstm" else (hx,)
        x, new_state = run_layers(self.run_layer, x, state, self.num_layers,
                                  lambda layer: layer_weights(self, layer),
                                  lambda x: F.dropout(x, self.dropout, self.training))
        return x, (new_state if self.cell == "lstm" else new_state[0])


# ------------------------------------------------------------------------- model


class RNNLM(nn.Module):
    """Embedding -> ``num_layers`` recurrent layers -> dropout -> linear projection to the vocabulary.

    The embedding size is ``cfg.embed_size``, else ``hidden_size`` when the
    weights are tied, else ``vocab_size`` (d2l's one-hot input: a one-hot vector
    times W_xh is a row lookup of W_xh). ``cfg.dropout`` acts between recurrent
    layers and on the last layer's output, in train mode only; so do the AWD-LSTM
    regularisers of ``ModelConfig``.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embed_size = cfg.embed_size or (cfg.hidden_size if cfg.tie_weights else vocab_size)
        if cfg.tie_weights and self.embed_size != cfg.hidden_size:
            raise ValueError(f"tie_weights needs embed_size == hidden_size, got "
                             f"{self.embed_size} and {cfg.hidden_size}")

        self.embedding = nn.Embedding(vocab_size, self.embed_size)
        between_layers = cfg.dropout if cfg.num_layers > 1 else 0.0  # torch warns on 1 layer + dropout
        if cfg.backend == "torch":
            self.rnn = torch_recurrent(cfg, self.embed_size, cfg.num_layers, dropout=between_layers)
            # Parameterless single-layer twins, for running the stack layer by layer (not submodules).
            self.torch_layers = [torch_recurrent(cfg, self.embed_size if layer == 0 else cfg.hidden_size, 1,
                                                 device="meta") for layer in range(cfg.num_layers)]
        else:
            self.rnn = ScratchRecurrent(cfg.cell, self.embed_size, cfg.hidden_size, cfg.num_layers,
                                        dropout=between_layers, nonlinearity=cfg.nonlinearity)
        self.layerwise = cfg.weight_drop > 0 or (cfg.num_layers > 1 and cfg.dropout_between > 0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.output = output_head(cfg, vocab_size)
        if cfg.tie_weights:
            self.output.weight = self.embedding.weight  # one tensor, two uses
        init_parameters(self, cfg.init, cfg.init_scale)

    def begin_state(self, batch_size: int, device=None) -> State:
        """The zero state for ``batch_size`` streams, in the model's dtype."""
        shape = (self.cfg.num_layers, batch_size, self.cfg.hidden_size)
        dtype = self.embedding.weight.dtype
        return tuple(torch.zeros(shape, dtype=dtype, device=device)
                     for _ in range(2 if self.cfg.cell == "lstm" else 1))

    def forward(self, X: torch.Tensor, state: State | None = None, targets: torch.Tensor | None = None,
                reduction: str = "mean", *, with_activations: bool = False):
        """Token ids ``X`` (B, T) -> logits (B, T, vocab_size) and the state after step T.

        With ``targets`` (B, T) the first result is the next-token cross-entropy instead
        (``reduction`` "mean", "sum" or "none" (B*T,)), computed without the full
        logits when the head is adaptive. The adaptive head's "logits" are its
        log-probabilities: softmax, argmax and temperature treat them exactly as logits.
        ``with_activations=True`` adds a third item, the last layer's ``(raw, dropped)``
        outputs (B, T, H), before and after output dropout: what AR and TAR penalise.
        """
        if X.dim() != 2:
            raise ValueError(f"X must be (batch, num_steps) token ids, got shape {tuple(X.shape)}")
        if state is None:
            state = self.begin_state(X.shape[0], X.device)
        self._check_state(state, X.shape[0])
        cfg, training = self.cfg, self.training
        # The recurrence runs in fp32 even under autocast: its state is an accumulator
        # carried across every step and window, where bf16's 8-bit mantissa loses it.
        with torch.autocast(X.device.type, enabled=False):
            x = embedding_dropout(self.embedding, X, cfg.dropout_embedding, training)
            x = locked_dropout(x, cfg.dropout_input, training)
            if training and self.layerwise:
                raw, state = self._run_layers(x, state)
            else:
                raw, hx = self.rnn(x, state if cfg.cell == "lstm" else state[0])
                state = tuple(hx) if cfg.cell == "lstm" else (hx,)
        dropped = self.dropout(locked_dropout(raw, cfg.dropout_output, training))
        result = self.logits(dropped) if targets is None else self.loss(dropped, targets, reduction)
        return (result, state, (raw, dropped)) if with_activations else (result, state)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Last-layer outputs (..., H) -> logits (..., vocab_size) (log-probabilities if adaptive)."""
        if isinstance(self.output, nn.AdaptiveLogSoftmaxWithLoss):
            with torch.autocast(features.device.type, enabled=False):
                flat = self.output.log_prob(features.reshape(-1, features.shape[-1]))
            return flat.reshape(*features.shape[:-1], self.vocab_size)
        return self.output(features)

    def loss(self, features: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy (nats) of last-layer outputs ``features`` (B, T, H), in fp32."""
        flat, y = features.reshape(-1, features.shape[-1]), targets.reshape(-1)
        if isinstance(self.output, nn.AdaptiveLogSoftmaxWithLoss):
            # In the features' dtype (fp32 under autocast: the recurrence is): autocast
            # would mix dtypes inside the module, which then fails in index_copy_.
            with torch.autocast(flat.device.type, enabled=False):
                nll = -self.output(flat, y).output
            return {"mean": nll.mean, "sum": nll.sum, "none": lambda: nll}[reduction]()
        logits = self.output(flat)
        if logits.dtype in (torch.float16, torch.bfloat16):  # the log-softmax in fp32 (CPU autocast keeps bf16)
            logits = logits.float()
        return F.cross_entropy(logits, y, reduction=reduction)

    def _run_layers(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The stack layer by layer, with locked dropout between layers and weight drop inside."""
        cfg = self.cfg

        def weights(layer: int) -> Weights:
            w_ih, w_hh, b_ih, b_hh = layer_weights(self.rnn, layer)
            return w_ih, drop_weight(w_hh, cfg.weight_drop, True), b_ih, b_hh

        def between(x: torch.Tensor) -> torch.Tensor:
            if cfg.dropout_between:
                return locked_dropout(x, cfg.dropout_between, True)
            return F.dropout(x, cfg.dropout, True)

        run_layer = self.rnn.run_layer if cfg.backend == "scratch" else self._torch_layer
        return run_layers(run_layer, x, state, cfg.num_layers, weights, between)

    def _torch_layer(self, layer: int, x: torch.Tensor, s: State, weights: Weights) -> tuple[torch.Tensor, State]:
        """One layer on torch's kernels (cuDNN on a GPU), with the given (possibly dropped) weights."""
        hx = tuple(part.unsqueeze(0) for part in s)
        names = [f"{name}_l0" for name in WEIGHT_NAMES]
        out, hx = functional_call(self.torch_layers[layer], dict(zip(names, weights)),
                                  (x, hx if self.cfg.cell == "lstm" else hx[0]))
        return out, tuple(part[0] for part in (hx if self.cfg.cell == "lstm" else (hx,)))

    def train(self, mode: bool = True) -> "RNNLM":
        super().train(mode)
        if not mode and isinstance(self.rnn, nn.RNNBase):
            # Layer-by-layer training let cuDNN regroup the weights per layer; the whole-stack
            # kernel used in eval wants them in one buffer again (else it copies, and warns).
            self.rnn.flatten_parameters()
        return self

    def _check_state(self, state: State, batch_size: int) -> None:
        expected = (self.cfg.num_layers, batch_size, self.cfg.hidden_size)
        count = 2 if self.cfg.cell == "lstm" else 1
        if not isinstance(state, tuple) or len(state) != count:
            raise ValueError(f"{self.cfg.cell} state must be a tuple of {count} tensor(s)")
        for s in state:
            if tuple(s.shape) != expected:
                raise ValueError(f"state tensors must be shaped {expected}, got {tuple(s.shape)}")


def torch_recurrent(cfg: ModelConfig, input_size: int, num_layers: int, *, dropout: float = 0.0,
                    device=None) -> nn.RNNBase:
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` for ``cfg`` (batch first)."""
    rnn_class = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cfg.cell]
    extra = {"nonlinearity": cfg.nonlinearity} if cfg.cell == "rnn" else {}
    return rnn_class(input_size, cfg.hidden_size, num_layers, dropout=dropout, batch_first=True,
                     device=device, **extra)


def output_head(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """A full ``Linear`` projection to the vocabulary, or torch's adaptive softmax."""
    if cfg.softmax == "full":
        return nn.Linear(cfg.hidden_size, vocab_size)
    if cfg.adaptive_cutoffs[-1] >= vocab_size:
        raise ValueError(f"adaptive_cutoffs {list(cfg.adaptive_cutoffs)} must all be below the "
                         f"vocabulary size {vocab_size}")
    return nn.AdaptiveLogSoftmaxWithLoss(cfg.hidden_size, vocab_size, list(cfg.adaptive_cutoffs),
                                         div_value=cfg.adaptive_div_value, head_bias=True)


def init_parameters(model: nn.Module, init: str, scale: float) -> None:
    """``normal``: weights N(0, scale), biases 0 (d2l). ``uniform``: everything U(-scale, scale)
    (classic PTB). ``default``: leave torch's own initialisation."""
    if init == "default":
        return
    for name, p in model.named_parameters():  # a tied tensor is listed (and initialised) once
        if init == "uniform":
            nn.init.uniform_(p, -scale, scale)
        elif "bias" in name:
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, 0.0, scale)


def detach_state(state: State) -> State:
    """Cut the autograd history (truncated backprop through time between batches)."""
    return tuple(s.detach() for s in state)


def build_model(cfg: ModelConfig, vocab_size: int) -> RNNLM:
    return RNNLM(cfg, vocab_size)
