"""The recurrent language model of d2l ch. 8-9: embedding -> recurrent stack -> vocabulary projection.

Two interchangeable backends run the recurrent stack:

* ``torch``: ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (cuDNN on a GPU).
* ``scratch``: ``pipeline.model.cells``, the cells written out step by step as readable
  reference implementations of the book's equations.

Both have the same ``state_dict`` (``pipeline.model.cells`` names its parameters as torch
does): a model trained with one loads into the other and gives the same outputs.

Regularisation (``pipeline.model.regularization``) acts in train mode only. Weight drop and
locked dropout between layers act inside the stack, so then both backends run it layer by
layer (``cells.run_layers``), drawing the masks in the same order: they agree in training too.
The torch backend runs each layer through ``torch.func.functional_call`` on a
parameterless (meta) single-layer twin: the parameters stay where they are (same
``state_dict``), and torch re-flattens the swapped-in weights for cuDNN itself.

The recurrent state is always a tuple of ``(num_layers, batch, hidden)`` tensors:
``(h,)`` for rnn/gru, ``(h, c)`` for lstm.

Only stdlib, torch, ``pipeline.model.cells``, ``pipeline.config`` and ``pipeline.model.regularization``
are imported: this file ships inside self-contained MLflow models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pipeline.model.cells import WEIGHT_NAMES, ScratchRecurrent, State, Weights, layer_weights, run_layers
from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.model.regularization import drop_weight, embedding_dropout, locked_dropout


class RNNLM(nn.Module):
    """Embedding -> ``num_layers`` recurrent layers -> dropout -> linear projection to the vocabulary.

    The embedding size is ``cfg.embed_size``, else ``hidden_size`` when the
    weights are tied, else ``vocab_size``: d2l's one-hot input, an embedding fixed
    to the identity and not trained (a one-hot vector times W_xh is a row lookup of
    W_xh; a learned V x V matrix in front would only multiply into W_xh, and its
    gradient costs time). It stays in the ``state_dict`` as ``embedding.weight``,
    so models from before it was fixed (trained there) still load and give their
    outputs. ``cfg.dropout`` acts between recurrent
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
        if cfg.embed_size is None and not cfg.tie_weights:  # d2l's one-hot input
            with torch.no_grad():
                self.embedding.weight.copy_(torch.eye(vocab_size))
            self.embedding.weight.requires_grad_(False)

    def begin_state(self, batch_size: int, device=None) -> State:
        """The zero state for ``batch_size`` streams, in the model's dtype."""
        shape = (self.cfg.num_layers, batch_size, self.cfg.hidden_size)
        dtype = self.embedding.weight.dtype
        return tuple(torch.zeros(shape, dtype=dtype, device=device)
                     for _ in range(2 if self.cfg.cell == "lstm" else 1))

    def forward(self, X: torch.Tensor, state: State | None = None, targets: torch.Tensor | None = None,
                reduction: str = "mean", *, with_activations: bool = False, last_only: bool = False):
        """Token ids ``X`` (B, T) -> logits (B, T, vocab_size) and the state after step T.

        With ``targets`` (B, T) the first result is the next-token cross-entropy instead
        (``reduction`` "mean", "sum" or "none" (B*T,)), computed without the full
        logits when the head is adaptive. The adaptive head's "logits" are its
        log-probabilities: softmax, argmax and temperature treat them exactly as logits.
        ``with_activations=True`` adds a third item, the last layer's ``(raw, dropped)``
        outputs (B, T, H), before and after output dropout: what AR and TAR penalise.
        ``last_only=True`` projects only step T to the vocabulary, logits (B, 1, vocab_size):
        generation's warm-up needs no more, and (B, T, vocab_size) can be large.
        """
        if X.dim() != 2:
            raise ValueError(f"X must be (batch, num_steps) token ids, got shape {tuple(X.shape)}")
        if state is None:
            state = self.begin_state(X.shape[0], X.device)
        self._check_state(state, X.shape[0])
        cfg, training = self.cfg, self.training
        # Inside, time-major (T, B, ...): the recurrent kernels' own layout (batch_first makes
        # torch transpose and copy on the way in and out, forward and backward).
        # The recurrence runs in fp32 even under autocast: its state is an accumulator
        # carried across every step and window, where bf16's 8-bit mantissa loses it.
        with torch.autocast(X.device.type, enabled=False):
            x = embedding_dropout(self.embedding, X.T, cfg.dropout_embedding, training)
            if cfg.dropout_input_mode == "per_step":
                x = F.dropout(x, cfg.dropout_input, training)
            else:
                x = locked_dropout(x, cfg.dropout_input, training)
            if training and self.layerwise:
                raw, state = self._run_layers(x, state)
            else:
                raw, hx = self.rnn(x, state if cfg.cell == "lstm" else state[0])
                state = tuple(hx) if cfg.cell == "lstm" else (hx,)
        dropped = locked_dropout(raw, cfg.dropout_output, training)
        if cfg.dropout:
            dropped = self.dropout(dropped)
        if targets is None:
            result = self.logits(dropped[-1:] if last_only else dropped).transpose(0, 1)
        else:
            result = self._loss(dropped, targets.T, reduction)
        return (result, state, (raw.transpose(0, 1), dropped.transpose(0, 1))) if with_activations \
            else (result, state)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Last-layer outputs (..., H) -> logits (..., vocab_size) (log-probabilities if adaptive)."""
        if isinstance(self.output, nn.AdaptiveLogSoftmaxWithLoss):
            with torch.autocast(features.device.type, enabled=False):
                flat = self.output.log_prob(features.reshape(-1, features.shape[-1]))
            return flat.reshape(*features.shape[:-1], self.vocab_size)
        return self.output(features)

    def _loss(self, features: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        """Next-token cross-entropy (nats, fp32) of time-major last-layer outputs ``features``
        (T, B, H) and ``targets`` (T, B); ``reduction="none"`` gives (B*T,), batch-major."""
        if isinstance(self.output, nn.AdaptiveLogSoftmaxWithLoss):
            # Batch-major rows: then each rank's rows of a cluster are a contiguous block of what
            # one process gathers, and sharded evaluation sums bit for bit what one process does
            # (interleaved time-major rows change the low bits). In the features' dtype (fp32
            # under autocast: the recurrence is): autocast would mix dtypes inside the module,
            # which then fails in index_copy_.
            flat = features.transpose(0, 1).reshape(-1, features.shape[-1])
            with torch.autocast(flat.device.type, enabled=False):
                nll = -self.output(flat, targets.T.reshape(-1)).output
            return nll if reduction == "none" else {"mean": nll.mean, "sum": nll.sum}[reduction]()
        logits = self.output(features.reshape(-1, features.shape[-1]))
        if logits.dtype in (torch.float16, torch.bfloat16):  # the log-softmax in fp32 (CPU autocast keeps bf16)
            logits = logits.float()
        y = targets.reshape(-1)
        if reduction != "none":
            return F.cross_entropy(logits, y, reduction=reduction)
        return F.cross_entropy(logits, y, reduction="none").reshape(targets.shape).T.reshape(-1)

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
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` for ``cfg`` (time-major: input (T, B, in))."""
    rnn_class = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cfg.cell]
    extra = {"nonlinearity": cfg.nonlinearity} if cfg.cell == "rnn" else {}
    return rnn_class(input_size, cfg.hidden_size, num_layers, dropout=dropout, device=device, **extra)


# The vocabulary size from which the adaptive head trains faster than the full softmax, by the
# training device's type (bench/train_throughput.py --sections softmax: on CPU 4.2x at 10k words;
# on an H200 0.66x at 10k, 0.64x at 50k, 1.21x at 250k). softmax="auto" picks by it; a device
# type not listed is treated as a GPU.
ADAPTIVE_FROM = {"cpu": 10_000, "cuda": 250_000}


def choose_softmax(cfg: ModelConfig, vocab_size: int, device_type: str) -> ModelConfig:
    """``cfg`` with ``softmax="auto"`` resolved to the head measured faster on this device type
    for this vocabulary (``ADAPTIVE_FROM``); other configs unchanged. Adaptive without given
    cutoffs gets ``default_cutoffs``."""
    if cfg.softmax != "auto":
        return cfg
    if vocab_size < ADAPTIVE_FROM.get(device_type, ADAPTIVE_FROM["cuda"]):
        update = {"softmax": "full", "adaptive_cutoffs": None}
    else:
        update = {"softmax": "adaptive", "adaptive_cutoffs": cfg.adaptive_cutoffs or default_cutoffs(vocab_size)}
    return ModelConfig.model_validate({**cfg.model_dump(), **update})


def default_cutoffs(vocab_size: int) -> tuple[int, ...]:
    """A shortlist of the 8% most frequent tokens, a cluster to 40%, the rest a tail cluster:
    the shape of bench/throughput_softmax.py's measured heads."""
    return (max(1, round(vocab_size * 0.08)), max(2, round(vocab_size * 0.4)))


def check_fits_vocabulary(cfg: ModelConfig, vocab_size: int) -> None:
    """ConfigError when the model cannot be built for this vocabulary (what validating the config
    alone cannot know): adaptive softmax cutoffs must all be below the vocabulary size."""
    if cfg.adaptive_cutoffs and cfg.adaptive_cutoffs[-1] >= vocab_size:
        raise ConfigError(f"model.adaptive_cutoffs {list(cfg.adaptive_cutoffs)} must all be below the "
                          f"dataset's vocabulary size {vocab_size}")


def output_head(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """A full ``Linear`` projection to the vocabulary, or torch's adaptive softmax."""
    if cfg.softmax == "auto":
        raise ValueError("softmax='auto' is resolved where the device is known: pass the config "
                         "through choose_softmax first")
    if cfg.softmax == "full":
        return nn.Linear(cfg.hidden_size, vocab_size)
    check_fits_vocabulary(cfg, vocab_size)
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
