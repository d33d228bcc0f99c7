"""One training run's state: what it carries from step to step (``Run``, built fresh by
``start_run``: model, optimizer, schedule), what the training since the last evaluation adds
up to (``Stretch``), and the dropout reseeding that makes a resumed run repeat the
uninterrupted one (``reseed``, ``rng_state``/``set_rng_state``).
The loop that drives them is ``pipeline.training.train``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.training.averaging import NTAverage
from pipeline.config import ModelConfig, TrainConfig
from pipeline.training.distributed import Dist
from pipeline.training.divergence import FiniteWatch
from pipeline.model.evaluate import perplexity
from pipeline.training.metrics import metrics_uri
from pipeline.model.models import build_model, choose_softmax
from pipeline.training.cuda_graph import check_cuda_graphs
from pipeline.training.optim import LRSchedule, make_optimizer
from pipeline.training.precision import MixedPrecision, set_matmul_precision
from pipeline.training.rundir import remove
from pipeline.data.sampling import num_batches, token_tensor
from pipeline.training.stopping import EarlyStopping


@dataclass
class Run:
    """One training run: its fixed inputs, the objects being trained, and how far it got."""

    train_ids: np.ndarray
    val_ids: np.ndarray
    vocab_size: int
    model_cfg: ModelConfig
    cfg: TrainConfig
    run_dir: str
    ckpt_dir: str
    d: Dist
    model: torch.nn.Module
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    watch: FiniteWatch
    mp: MixedPrecision
    steps_per_epoch: int
    averager: NTAverage | None  # nt_asgd: the trigger and the averaged weights
    early_stopping: EarlyStopping
    train_tokens: torch.Tensor | None = None  # CUDA: the training split on the device
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps (global: the same on every rank)
    elapsed_before: float = 0.0  # training seconds of earlier attempts (from the checkpoint)
    hidden: list[torch.Tensor] | None = None  # mid-epoch resume, sequential: the global state
    rng: list[dict[str, torch.Tensor]] | None = None  # resume after a budget stop: every rank's RNG state
    stretch: Stretch | None = None  # the training since the last evaluation
    saved_stretch: dict[str, float] = field(default_factory=dict)  # resume: the checkpoint's (global) sums
    best: dict[str, Any] = field(default_factory=lambda: {"val_ppl": math.inf, "epoch": 0, "model": None})
    last_checkpoint: str | None = None  # rank 0: the newest checkpoint written or resumed from
    validated: bool = False  # this attempt has validated (else _finish does)
    tokens_trained: int = 0  # this attempt
    train_time: float = 0.0  # this attempt
    val_ppl: float | None = None  # the last evaluation's; None without a validation split
    stop: str | None = None  # why the run ends early: a budget, or early stopping
    t_start: float = field(default_factory=time.perf_counter)
    params: list[torch.nn.Parameter] = field(init=False)  # the model's, what clipping sees
    graphed: Any = None  # train.cuda_graphs: the step as a CUDA graph (cuda_graph.GraphedStep)

    def __post_init__(self):
        self.params = list(self.model.parameters())

    @property
    def metrics(self) -> str:
        return metrics_uri(self.run_dir)

    @property
    def evaluated_model(self) -> torch.nn.Module:
        """What is validated, kept as best and shipped: the averaged weights once NT-ASGD averages."""
        return self.averager.evaluated_model() if self.averager else self.model

    @property
    def steps_into_epoch(self) -> int:
        return self.step - self.epoch * self.steps_per_epoch

    @property
    def evaluates_by_steps(self) -> bool:
        return self.cfg.eval_every_steps is not None

    def evaluation_due(self) -> bool:
        """Whether the step just taken ends a stretch: an epoch's end, or every eval_every_steps."""
        if self.evaluates_by_steps:
            return self.step % self.cfg.eval_every_steps == 0
        return self.steps_into_epoch == 0

    @property
    def has_validation(self) -> bool:
        return len(self.val_ids) >= 2

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def validate(self) -> float | None:
        """The validation perplexity (of the averaged weights once NT-ASGD averages) with the
        pipeline's one evaluation setting (pipeline.model.evaluate), sharded: each rank scores a contiguous
        slice of the streams and one all-reduce gives every rank the single-process figure. Called
        on every rank."""
        if not self.has_validation:
            return None
        return perplexity(self.evaluated_model, self.val_ids, device=self.d.device, rank=self.d.rank,
                          world_size=self.d.world_size)


@dataclass
class Stretch:
    """The training since the last evaluation (by default: the epoch so far), which the next
    metrics line reports. The sums are this rank's, on device (no host sync per step); on
    rank 0 they start from what a resumed checkpoint carried, which was summed over ranks."""

    loss_sum: torch.Tensor
    norm_sum: torch.Tensor
    steps: int = 0  # global optimizer steps in the stretch, all attempts
    tokens: int = 0  # trained in this attempt, global (all ranks)
    t0: float = field(default_factory=time.perf_counter)  # when this attempt's part of it began

    @classmethod
    def begin(cls, device: torch.device, loss_sum: float = 0.0, norm_sum: float = 0.0, steps: int = 0) -> Stretch:
        return cls(torch.tensor(loss_sum, device=device), torch.tensor(norm_sum, device=device), steps)


def start_run(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int, model_cfg: ModelConfig,
              cfg: TrainConfig, run_dir: str, ckpt_dir: str, d: Dist) -> Run:
    """A fresh model, optimizer and schedule. Same seed on every rank -> same init (DDP broadcasts it anyway)."""
    if d.is_main:
        fs, path = storage.filesystem(run_dir)
        fs.makedirs(path, exist_ok=True)
        remove(storage.join(run_dir, "FAILED.json"))  # a stale verdict from an earlier attempt
    torch.manual_seed(cfg.seed)
    set_matmul_precision(cfg.tf32, d.device)
    model_cfg = choose_softmax(model_cfg, vocab_size, d.device.type)  # what is saved and checkpointed
    check_cuda_graphs(model_cfg, cfg, d.device, d.world_size)
    model = build_model(model_cfg, vocab_size).to(d.device)
    optimizer = make_optimizer(model, cfg)
    # On a GPU the split lives there (a byte per token at char level; pinned host memory if it
    # does not fit) and batches are sliced there; on CPU the sampler's numpy batches of the
    # memory-mapped split are already where they are needed.
    tokens = token_tensor(train_ids, vocab_size, d.device) if d.device.type == "cuda" else None
    mp = MixedPrecision(cfg.precision, d.device, graphs=cfg.cuda_graphs)
    return Run(train_ids, val_ids, vocab_size, model_cfg, cfg, run_dir, ckpt_dir, d, model, model,
               optimizer, LRSchedule(optimizer, cfg), FiniteWatch(d.device), mp,
               num_batches(len(train_ids), cfg.batch_size, cfg.num_steps, cfg.sampling),
               NTAverage(model, cfg.nt_asgd_window) if cfg.optimizer == "nt_asgd" else None,
               EarlyStopping(cfg.patience), train_tokens=tokens)


def reseed(seed: int, epoch: int, step: int, rank: int) -> None:
    """Dropout RNG for the stretch of training that starts at (epoch, step) on ``rank``."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0]))


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's dropout RNG state. A budget can stop a run at any step, where an
    uninterrupted run does not reseed, so that checkpoint keeps the state itself."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
