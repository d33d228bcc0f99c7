"""The training step replayed as one CUDA graph (``train.cuda_graphs: true``).

A small recurrent model's GPU step takes a few milliseconds, most of them the host launching
hundreds of small kernels one after another; a captured graph launches them all at once. The
step is the forward pass, backward, clipping and the optimizer's update; what the trainer does
around it (the finite check, the stretch's sums, evaluations, checkpoints) stays as it is.

The first ``WARMUP_STEPS`` steps of a process run eagerly on a side stream (cuDNN and the
caching allocator set themselves up: torch's recipe for whole-network capture), then the step is
captured on fixed input tensors and replayed for every batch, the batch copied in first. The
captured kernels are the eager ones, and each replay's dropout draws start where the CUDA
generator stands (a reseed included), so a replayed step computes what the eager step would;
a resumed run warms up again and goes on as one that never stopped. A learning rate is a
constant inside the graph: when the schedule changes it, the step is captured again. Under
sequential sampling the graph copies the state it ends with into its input state, so the next
replay continues from there.

Not with several ranks (DDP's all-reduce hooks), fp16 (the gradient scaler reads the device
every step), variable BPTT (a new batch length every step), NT-ASGD (it swaps the weights the
graph holds) or the adaptive softmax (its clusters' sizes depend on the targets):
``check_cuda_graphs`` names the conflict.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pipeline.config import ModelConfig, TrainConfig
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

WARMUP_STEPS = 3  # eager steps before the first capture

Step = Callable[[torch.Tensor, torch.Tensor, tuple | None], tuple[torch.Tensor, torch.Tensor, tuple]]


def check_cuda_graphs(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, world_size: int) -> None:
    """ConfigError naming what rules out ``train.cuda_graphs`` for this run (see the module docstring)."""
    if not cfg.cuda_graphs:
        return
    problems = []
    if device.type != "cuda":
        problems.append(f"it needs a CUDA device (this run trains on {device.type})")
    if world_size > 1:
        problems.append(f"it runs one process (this run has {world_size} ranks)")
    if model_cfg.softmax != "full":
        problems.append("it needs model.softmax: full (the adaptive head's cluster sizes follow the targets)")
    if problems:
        raise ConfigError("train.cuda_graphs: " + "; ".join(problems))


class GraphedStep:
    """``step(X, Y, state) -> (loss, gradient norm, state after the step)``, replayed as a CUDA graph.

    ``step`` is the trainer's own step function; ``carry_state`` (sequential sampling) carries
    the state from one replay to the next. The tensors returned are the graph's own, rewritten
    by the next call: read or copy them before then.
    """

    def __init__(self, step: Step, optimizer: torch.optim.Optimizer, begin_state: Callable[[int], tuple],
                 carry_state: bool):
        self.step, self.optimizer, self.begin_state, self.carry_state = step, optimizer, begin_state, carry_state
        self.side: torch.cuda.Stream | None = None  # the warm-up's stream
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pool = None  # the graphs' memory, shared by every capture
        self.lrs: list[float] = []
        self.x = self.y = None
        self.state_in: tuple[torch.Tensor, ...] = ()
        self.out: tuple[torch.Tensor, torch.Tensor, tuple] | None = None
        self.captures = 0

    def __call__(self, X: torch.Tensor, Y: torch.Tensor, state):
        if self.eager_steps < WARMUP_STEPS:
            return self._eager(X, Y, state)
        if self.x is None or X.shape != self.x.shape:
            if self.x is not None:
                log.warning("batch shape %s is not the captured %s: this step runs eagerly",
                            tuple(X.shape), tuple(self.x.shape))
                return self._eager(X, Y, state)
            self._allocate(X, Y)
        self._load(X, Y, state)
        if self.graph is None or self.lrs != self._current_lrs():
            self._capture()
        self.graph.replay()
        return self.out

    def _current_lrs(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def _eager(self, X, Y, state):
        out = self._on_side_stream(lambda: self.step(X, Y, state))
        self.eager_steps += 1
        return out

    def _on_side_stream(self, fn: Callable[[], tuple]) -> tuple:
        if self.side is None:
            self.side = torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.side)
        return out

    def _allocate(self, X, Y) -> None:
        """The fixed inputs, outside any graph's memory (they outlive captures)."""
        self.x, self.y = torch.empty_like(X), torch.empty_like(Y)
        self.state_in = tuple(torch.empty_like(s) for s in self.begin_state(X.shape[0]))

    def _load(self, X, Y, state) -> None:
        self.x.copy_(X)
        self.y.copy_(Y)
        if state is None:
            for s in self.state_in:
                s.zero_()
        elif [s.data_ptr() for s in state] != [s.data_ptr() for s in self.state_in]:
            for mine, given in zip(self.state_in, state):
                mine.copy_(given)

    def _capture(self) -> None:
        """Record one step on the fixed inputs (nothing runs until ``replay``)."""
        self.graph = self.out = None  # the previous capture's memory goes back to the pool
        self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it writes
        self.graph, self.out = self._record(self._step_on_fixed_inputs)
        self.lrs = self._current_lrs()
        self.captures += 1
        log.info("training step captured as a CUDA graph (capture %d, lr %s)", self.captures, self.lrs)

    def _step_on_fixed_inputs(self) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        loss, norm, state_out = self.step(self.x, self.y, self.state_in)
        if self.carry_state:
            for mine, new in zip(self.state_in, state_out):
                mine.copy_(new.detach())
            state_out = self.state_in
        return loss, norm, state_out

    def _record(self, fn: Callable[[], tuple]) -> tuple[torch.cuda.CUDAGraph, tuple]:
        """(the graph, what ``fn`` returned): its kernels recorded, not run, until ``replay``."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.pool = graph.pool()
        return graph, out
