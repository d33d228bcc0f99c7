"""``train.cuda_graphs``' bookkeeping on CPU: the trainer with ``GraphedStep`` and the graph emulated.

A CUDA graph records a step's kernels once and replays them on fixed tensors; what the trainer
and ``GraphedStep`` must get right around that is CPU-checkable: the batch and the state copied
into the fixed inputs, the sequential state carried from one replay to the next (zeroed under
random sampling), the outputs read before the next replay overwrites them, a new capture when
the learning rate changes, and a resumed process warming up and capturing anew.

``ReplayedOnCPU`` keeps all of that and stands in for the two CUDA calls: recording runs the step
once and undoes it (weights, optimizer state, RNG), as a capture computes nothing; a replay runs
it again and writes its results into the tensors the recording returned, as a graph rewrites
its outputs. Every step then computes what the eager step computes, so an emulated run must
equal the eager run bit for bit; anything lost in the bookkeeping shows as a difference. What it
cannot see: a step whose Python code does something per call (a graph runs it only once, at
capture) and CUDA's own capture rules: tests/test_gpu.py trains with the real graphs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import ModelConfig, TrainConfig
from pipeline.training import cuda_graph, run_state
from pipeline.training import train as train_module
from pipeline.training.cuda_graph import GraphedStep
from pipeline.training.train import train
from tests.test_train import corpus, epochs_of, weights

MODEL = {"cell": "gru", "hidden_size": 32, "embed_size": 16, "dropout_output": 0.3}
TRAIN = {"epochs": 2, "batch_size": 8, "num_steps": 10, "optimizer": "sgd", "lr": 1.0, "clip_norm": 1.0,
         "momentum": 0.9, "device": "cpu"}


class Replay:
    """A recorded step: ``replay()`` runs it and writes its results where the recording's went."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self) -> None:
        loss, norm, state = self.fn()
        with torch.no_grad():
            self.out[0].copy_(loss)
            self.out[1].copy_(norm)
            for mine, new in zip(self.out[2], state):
                mine.copy_(new)


class ReplayedOnCPU(GraphedStep):
    recordings: list[list[float]] = []  # each capture's learning rates, across runs of one test

    def _on_side_stream(self, fn):
        return fn()

    def _record(self, fn):
        # What the step writes in place: the weights and the carried state (and the optimizer's state).
        written = [p for group in self.optimizer.param_groups for p in group["params"]] + list(self.state_in)
        saved = ([t.detach().clone() for t in written], copy.deepcopy(self.optimizer.state_dict()),
                 torch.get_rng_state())
        out = fn()  # a capture computes nothing: undo the step it ran
        with torch.no_grad():
            for t, value in zip(written, saved[0]):
                t.copy_(value)
        self.optimizer.load_state_dict(saved[1])
        torch.set_rng_state(saved[2])
        ReplayedOnCPU.recordings.append(self._current_lrs())
        return Replay(fn, out), out


@pytest.fixture
def emulated_graphs(monkeypatch):
    ReplayedOnCPU.recordings = []
    monkeypatch.setattr(train_module, "GraphedStep", ReplayedOnCPU)
    real_check = run_state.check_cuda_graphs
    # The checks but the device's (tests/test_train.py checks that one).
    monkeypatch.setattr(run_state, "check_cuda_graphs",
                        lambda m, c, device, world: real_check(m, c, torch.device("cuda"), world))
    return ReplayedOnCPU.recordings


def run_both(tmp_path, model: dict, train_cfg: dict, tokens: int = 6_000):
    tr, va, vocab = corpus(tokens)
    cfg = {**TRAIN, **train_cfg}
    eager = train(tr, va, vocab, ModelConfig(**model), TrainConfig(**cfg), str(tmp_path / "eager"))
    graphed = train(tr, va, vocab, ModelConfig(**model), TrainConfig(**cfg, cuda_graphs=True),
                    str(tmp_path / "graphed"))
    return eager, graphed


CLOCK = ("tokens_per_s", "elapsed_s")  # what may differ between two metrics lines of the same training


def assert_same_weights(a_dir, b_dir):
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_identical(a_dir, b_dir):
    assert_same_weights(a_dir, b_dir)
    figures = [[{k: v for k, v in line.items() if k not in CLOCK} for line in epochs_of(d)] for d in (a_dir, b_dir)]
    assert figures[0] == figures[1]


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_the_replayed_step_trains_what_the_eager_step_trains(tmp_path, emulated_graphs, sampling):
    eager, graphed = run_both(tmp_path, MODEL, {"sampling": sampling})
    assert emulated_graphs == [[1.0]]  # one capture after the warm-up, replayed for every later step
    assert graphed["steps"] == eager["steps"] > cuda_graph.WARMUP_STEPS + 10
    assert_identical(tmp_path / "eager", tmp_path / "graphed")


def test_a_learning_rate_change_captures_again(tmp_path, emulated_graphs):
    run_both(tmp_path, MODEL, {"epochs": 3, "lr_schedule": "decay", "lr_decay": 0.5, "lr_decay_after": 1})
    assert emulated_graphs == [[1.0], [0.5], [0.25]]
    assert_identical(tmp_path / "eager", tmp_path / "graphed")


def test_a_graphed_run_resumes_as_if_never_stopped(tmp_path, emulated_graphs):
    """Stopped mid-epoch by max_steps (the checkpoint holds the carried state and the RNG), then
    resumed in a new GraphedStep that warms up and captures anew: the uninterrupted run's weights."""
    tr, va, vocab = corpus(6_000)
    cfg = {**TRAIN, "cuda_graphs": True}
    train(tr, va, vocab, ModelConfig(**MODEL), TrainConfig(**cfg), str(tmp_path / "ref"))
    stopped = train(tr, va, vocab, ModelConfig(**MODEL), TrainConfig(**cfg, max_steps=40), str(tmp_path / "run"))
    assert stopped["steps"] == 40
    train(tr, va, vocab, ModelConfig(**MODEL), TrainConfig(**cfg), str(tmp_path / "run"))
    assert len(emulated_graphs) == 3  # the reference's, the stopped run's, the resumed run's
    assert_same_weights(tmp_path / "ref", tmp_path / "run")
