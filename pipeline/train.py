"""Train a recurrent language model: one process, or many under torchrun (DDP).

    python -m pipeline.train --run-dir DIR --dataset URI --config RUN.yaml
    torchrun --nproc-per-node 2 -m pipeline.train --run-dir DIR --dataset URI --config RUN.yaml

``train()`` is the whole loop, top to bottom. Things worth knowing:

* Batches. ``cfg.batch_size`` is global: every rank draws the same global batch
  from the sampler's seeded generator and keeps its own rows, so N ranks with
  B/N rows each compute exactly what one process with B rows does (DDP averages
  the gradients; every rank holds the same number of tokens).
* Determinism. Model init is seeded by ``cfg.seed``; the data order is a function
  of (seed, epoch); the dropout RNG is reseeded from (seed, epoch, step, rank) at
  every epoch start and checkpoint. So a checkpoint needs no generator state and
  a resumed run repeats the uninterrupted one exactly.
* Checkpoints, written by rank 0 at every epoch end (and every
  ``checkpoint_every_steps``), are resumed from automatically. Mid-epoch ones
  under sequential sampling carry the recurrent state of every rank's streams.
* Failure. A non-finite gradient norm (identical on every rank after DDP's
  all-reduce, so all ranks stop at the same step with no extra collective) or a
  non-finite epoch loss stops training: no checkpoint is written, FAILED.json
  says why, and the exit code is EXIT_DO_NOT_RETRY.

Outputs in the run directory: checkpoints/, metrics.jsonl (one JSON line per
epoch, also printed to stdout), model.pt, model_config.json, train_config.json,
result.json; FAILED.json on a failure that retrying cannot fix.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import storage
from pipeline.checkpoint import check_compatible, latest_valid, load_checkpoint, save_checkpoint
from pipeline.config import ModelConfig, RunConfig, TrainConfig, load_config
from pipeline.errors import (EXIT_DO_NOT_RETRY, EXIT_FAILED, EXIT_OK, CheckpointError, ConfigError, DatasetError,
                             NonFiniteLossError, PipelineError)
from pipeline.evaluate import perplexity
from pipeline.models import build_model, detach_state
from pipeline.sampling import batches, num_batches, rank_rows

log = logging.getLogger("pipeline.train")

PROGRESS_EVERY_S = 30.0  # rank 0 logs a progress line this often within a long epoch
FAILURE_REASONS = {NonFiniteLossError: "non_finite_loss", ConfigError: "bad_config",
                   DatasetError: "bad_dataset", CheckpointError: "bad_checkpoint"}


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    """Where this process sits: torchrun's environment, or a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto", *, placement: tuple[int, int, int, int] | None = None,
                      cuda_index: int | None = None) -> Dist:
    """Pick the device and join the process group (unless the launcher already did).

    ``placement`` is (rank, world_size, local_rank, local_world_size); by default it is
    read from torchrun's RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE. ``cuda_index`` is
    the visible GPU this rank drives, LOCAL_RANK by default (Ray assigns its own).
    """
    env = os.environ
    rank, world_size, local_rank, local_world_size = placement or (
        int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
        int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1)))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        gpu = local_rank if cuda_index is None else cuda_index
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but no CUDA device is available")
        if gpu >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: this node has "
                              f"{torch.cuda.device_count()} (use --nproc-per-node <= that)")
        dev = torch.device("cuda", gpu)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    # Ranks on one node share its cores; oversubscribing them makes every rank slow
    # (OpenMP threads spin). RNNLM_NUM_THREADS overrides, e.g. on a machine shared with others.
    threads = os.environ.get("RNNLM_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads else max(1, _cpu_count() // local_world_size))
    if world_size > 1 and not dist.is_initialized():  # Ray Train sets the group up itself
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, world_size, local_rank, local_world_size, dev)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def broadcast_from_main(values: list[float], d: Dist) -> list[float]:
    """Rank 0's ``values`` on every rank (decisions all ranks must share)."""
    if not d.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.broadcast(t, src=0)
    return t.tolist()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    t = t.clone()
    if d.distributed:
        dist.all_reduce(t)
    return t


# ------------------------------------------------------------------------------ pieces


def clip_gradients(parameters: Iterable[torch.nn.Parameter], theta: float | None) -> float:
    """d2l's clipping by global L2 norm: g <- min(1, theta / ||g||) * g. Returns ||g|| before."""
    return float(clip_gradients_(list(parameters), theta))


def clip_gradients_(parameters: list[torch.nn.Parameter], theta: float | None) -> torch.Tensor:
    """``clip_gradients`` without the host sync: the norm stays a tensor.

    Scaling by ``min(1, theta/||g||)`` unconditionally (1.0 is exact) avoids the
    ``if norm > theta`` branch, which would stall a GPU every step.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if theta is not None:
        torch._foreach_mul_(grads, torch.clamp(theta / norm, max=1.0))
    return norm


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


class LRSchedule:
    """The learning rate of each epoch, set on the optimizer; its state is checkpointed.

    * ``constant``: ``cfg.lr`` throughout.
    * ``decay``: epoch ``n`` (1-based) trains at ``lr * lr_decay ** max(0, n - lr_decay_after)``
      (the classic PTB recipe: ``lr_decay_after`` epochs at full rate, then geometric).
    * ``plateau``: multiply by ``lr_decay`` once validation perplexity has not improved
      for ``lr_patience`` epochs in a row (0 counts as 1).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.optimizer, self.cfg = optimizer, cfg
        self.lr = self._decayed(1) if cfg.lr_schedule == "decay" else cfg.lr
        self.best, self.bad_epochs = math.inf, 0
        self._apply()

    def _decayed(self, epoch: int) -> float:
        return self.cfg.lr * self.cfg.lr_decay ** max(0, epoch - self.cfg.lr_decay_after)

    def step(self, epochs_done: int, val_ppl: float) -> None:
        """Called after each epoch: sets the rate for the next one."""
        if self.cfg.lr_schedule == "decay":
            self.lr = self._decayed(epochs_done + 1)
        elif self.cfg.lr_schedule == "plateau":
            if val_ppl < self.best:
                self.best, self.bad_epochs = val_ppl, 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs >= max(1, self.cfg.lr_patience):
                    self.lr, self.bad_epochs = self.lr * self.cfg.lr_decay, 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.best, self.bad_epochs = float(state["lr"]), float(state["best"]), int(state["bad_epochs"])
        self._apply()


class FiniteWatch:
    """Raises NonFiniteLossError at the first step whose gradient norm is NaN or inf.

    On CPU the check is immediate. On a GPU each step's flag is copied to pinned
    host memory asynchronously and read one step later, so the GPU queue never
    drains; ``flush()`` (before every checkpoint) waits for the last one.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.host = torch.ones(2, dtype=torch.bool, pin_memory=True)
            self.events = [torch.cuda.Event(), torch.cuda.Event()]
        self.pending: tuple[int, int] | None = None  # (slot, step) not yet read

    def push(self, norm: torch.Tensor, step: int) -> None:
        if not self.cuda:
            if not torch.isfinite(norm):
                raise non_finite(step)
            return
        slot = step % 2
        self.host[slot].copy_(torch.isfinite(norm), non_blocking=True)
        self.events[slot].record()
        previous, self.pending = self.pending, (slot, step)
        if previous is not None:
            self._read(*previous)

    def flush(self) -> None:
        if self.pending is not None:
            previous, self.pending = self.pending, None
            self._read(*previous)

    def _read(self, slot: int, step: int) -> None:
        self.events[slot].synchronize()
        if not self.host[slot]:
            raise non_finite(step)


def non_finite(step: int) -> NonFiniteLossError:
    err = NonFiniteLossError(
        f"non-finite loss/gradient at step {step}: training diverged (lower lr, set clip_norm); "
        f"the last good checkpoint is kept")
    err.step = step
    return err


def reseed(seed: int, epoch: int, step: int, rank: int) -> None:
    """Dropout RNG for the stretch of training that starts at (epoch, step) on ``rank``."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0]))


def gather_hidden(state: tuple[torch.Tensor, ...], d: Dist) -> list[torch.Tensor]:
    """Every rank's rows of the recurrent state, concatenated in rank order: the global (L, B, H)."""
    parts = []
    for s in state:
        if d.distributed:
            chunks = [torch.empty_like(s) for _ in range(d.world_size)]
            dist.all_gather(chunks, s.contiguous())
            s = torch.cat(chunks, dim=1)
        parts.append(s.detach().cpu())
    return parts


# ------------------------------------------------------------------------------- train


def train(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int, model_cfg: ModelConfig,
          cfg: TrainConfig, run_dir: str, *, checkpoint_dir: str | None = None,
          dist_info: Dist | None = None) -> dict[str, Any]:
    """Train (or resume training) and write the run directory. Returns result.json's contents.

    Without ``dist_info`` the process group is set up from the environment (and
    torn down at the end). Raises PipelineError on expected failures, after
    writing FAILED.json.
    """
    own_group = dist_info is None
    d = dist_info or setup_distributed(cfg.device)
    try:
        return _train(train_ids, val_ids, vocab_size, model_cfg, cfg, run_dir,
                      checkpoint_dir or storage.join(run_dir, "checkpoints"), d)
    except PipelineError as e:
        if d.is_main:
            write_failure(run_dir, e)
        e.recorded = True  # main() need not write FAILED.json again
        raise
    finally:
        if own_group and d.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(train_ids, val_ids, vocab_size, model_cfg, cfg, run_dir, ckpt_dir, d: Dist) -> dict[str, Any]:
    check_inputs(train_ids, val_ids, vocab_size, cfg, d)
    steps_per_epoch = num_batches(len(train_ids), cfg.batch_size, cfg.num_steps, cfg.sampling)
    tokens_per_step = cfg.batch_size * cfg.num_steps  # global, all ranks
    metrics_uri = storage.join(run_dir, "metrics.jsonl")
    if d.is_main:
        fs, path = storage.filesystem(run_dir)
        fs.makedirs(path, exist_ok=True)
        _remove(storage.join(run_dir, "FAILED.json"))  # a stale verdict from an earlier attempt

    # Model, optimizer, schedule. Same seed on every rank -> same init (DDP broadcasts it anyway).
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, vocab_size).to(d.device)
    optimizer = make_optimizer(model, cfg)
    schedule = LRSchedule(optimizer, cfg)
    params = list(model.parameters())

    # Resume from the newest valid checkpoint; rank 0 chooses so that all ranks agree.
    epoch, step, elapsed_before = 0, 0, 0.0
    hidden, stats = None, {"loss_sum": 0.0, "norm_sum": 0.0}
    best = {"val_ppl": math.inf, "epoch": 0, "model": None}  # rank 0: the lowest-val-ppl weights so far
    found = latest_valid(ckpt_dir) if d.is_main else None
    uri = _broadcast_object(found[1] if found else None, d)
    if uri is not None:
        ckpt = found[0] if d.is_main else load_checkpoint(uri)
        check_compatible(ckpt, uri, model_config=model_cfg.model_dump(mode="json"),
                         train_config=cfg.model_dump(mode="json"), vocab_size=vocab_size,
                         train_tokens=len(train_ids))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["scheduler"])
        epoch, step, elapsed_before = ckpt["epoch"], ckpt["step"], ckpt["elapsed_s"]
        hidden, stats = ckpt.get("hidden"), ckpt["epoch_stats"]
        best = ckpt.get("best") or best
        if d.is_main:
            log.info("resuming from epoch %d step %d (%s)", epoch, step, uri)
            print(json.dumps({"event": "resume", "epoch": epoch, "step": step, "checkpoint": uri}), flush=True)
            _truncate_metrics(metrics_uri, epoch)
            if ckpt["world_size"] != d.world_size:
                log.info("checkpoint was written with %d ranks, resuming with %d", ckpt["world_size"], d.world_size)
        del ckpt
    elif d.is_main:
        log.info("starting fresh: %d epochs of %d steps, %d rank(s) on %s", cfg.epochs,
                 steps_per_epoch, d.world_size, d.device)
        _remove(metrics_uri)
    ddp_model = DDP(model, device_ids=[d.device] if d.device.type == "cuda" else None) if d.distributed else model

    def checkpoint(epoch_stats, hidden_parts):
        payload = {"epoch": epoch, "step": step, "model": model.state_dict(),
                   "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                   "hidden": hidden_parts, "epoch_stats": epoch_stats, "best": best,
                   "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                   "model_config": model_cfg.model_dump(mode="json"),
                   "train_config": cfg.model_dump(mode="json"), "vocab_size": vocab_size,
                   "train_tokens": len(train_ids), "world_size": d.world_size}
        written = save_checkpoint(ckpt_dir, payload, keep=cfg.keep_checkpoints)
        log.info("checkpoint %s", written)

    watch = FiniteWatch(d.device)
    t_start = time.perf_counter()
    tokens_trained, train_time, val_ppl = 0, 0.0, None
    # max_minutes counts the training time of all attempts (it is saved in checkpoints);
    # elapsed_before comes from the same checkpoint on every rank, so they agree.
    stop = cfg.max_minutes is not None and elapsed_before > cfg.max_minutes * 60
    while epoch < cfg.epochs and not stop:
        # ---- one epoch (possibly the rest of one, when resuming mid-epoch)
        first = step - epoch * steps_per_epoch  # batches of this epoch already trained
        state = None
        if first and hidden is not None:  # sequential sampling: this rank's rows of every stream
            rows = rank_rows(cfg.batch_size, d.rank, d.world_size)
            state = tuple(h[:, rows].contiguous().to(d.device) for h in hidden)
        hidden = None
        mine = d.is_main  # mid-epoch sums were saved globally: count them once
        loss_sum = torch.tensor(stats["loss_sum"] if first and mine else 0.0, device=d.device)
        norm_sum = torch.tensor(stats["norm_sum"] if first and mine else 0.0, device=d.device)
        reseed(cfg.seed, epoch, step, d.rank)
        ddp_model.train()
        t_epoch, t_log, steps_here = time.perf_counter(), time.perf_counter(), 0

        for X, Y in batches(train_ids, cfg.batch_size, cfg.num_steps, cfg.sampling, seed=cfg.seed,
                            epoch=epoch, rank=d.rank, world_size=d.world_size, start=first):
            X = torch.from_numpy(X).to(d.device, non_blocking=True)
            Y = torch.from_numpy(Y).to(d.device, non_blocking=True)
            if cfg.sampling == "random":
                state = None  # unrelated windows: start every batch from the zero state
            elif state is not None:
                state = detach_state(state)  # truncated BPTT: keep the values, drop the graph
            logits, state = ddp_model(X, state)
            loss = F.cross_entropy(logits.reshape(-1, vocab_size), Y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DDP this also averages the gradients over ranks
            norm = clip_gradients_(params, cfg.clip_norm)  # after the all-reduce: the global norm
            watch.push(norm, step + 1)
            optimizer.step()
            step += 1
            steps_here += 1
            loss_sum += loss.detach()
            norm_sum += norm

            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 \
                    and step % steps_per_epoch:  # epoch ends checkpoint below
                watch.flush()
                sums = all_reduce_sum(torch.stack([loss_sum, norm_sum]), d).tolist()
                if not math.isfinite(sums[0]):
                    raise non_finite(step)
                parts = gather_hidden(state, d) if cfg.sampling == "sequential" else None
                if d.is_main:
                    checkpoint({"loss_sum": sums[0], "norm_sum": sums[1]}, parts)
                reseed(cfg.seed, epoch, step, d.rank)  # as a run resuming here will
            if d.is_main and time.perf_counter() - t_log > PROGRESS_EVERY_S:
                t_log = time.perf_counter()
                log.info("epoch %d step %d/%d loss %.4f grad_norm %.3f", epoch + 1,
                         step - epoch * steps_per_epoch, steps_per_epoch, loss.item(), norm.item())

        # ---- epoch end: global loss, validation, schedule, metrics, checkpoint
        watch.flush()
        sums = all_reduce_sum(torch.stack([loss_sum, norm_sum]), d).tolist()  # syncs the device
        seconds = time.perf_counter() - t_epoch
        train_loss = sums[0] / (steps_per_epoch * d.world_size)
        if not math.isfinite(train_loss):
            raise non_finite(step)
        epoch += 1
        tokens_trained += steps_here * tokens_per_step
        train_time += seconds
        elapsed = elapsed_before + time.perf_counter() - t_start
        val_ppl = _validate(model, val_ids, cfg, d) if d.is_main else 0.0
        over_time = cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60
        val_ppl, stop = broadcast_from_main([val_ppl, float(over_time)], d)
        if d.is_main and cfg.keep_best and val_ppl < best["val_ppl"]:
            best = {"val_ppl": val_ppl, "epoch": epoch,
                    "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
        lr = schedule.lr
        schedule.step(epoch, val_ppl if math.isfinite(val_ppl) else _exp(train_loss))
        if d.is_main:
            emit(metrics_uri, {"event": "epoch", "epoch": epoch, "step": step,
                               "train_ppl": _or_none(_exp(train_loss)), "val_ppl": _or_none(val_ppl),
                               "tokens_per_s": steps_here * tokens_per_step / seconds,
                               "grad_norm": sums[1] / (steps_per_epoch * d.world_size), "lr": lr,
                               "elapsed_s": elapsed})
            checkpoint({"loss_sum": 0.0, "norm_sum": 0.0}, None)
        if stop and epoch < cfg.epochs and d.is_main:
            log.info("max_minutes=%g reached after epoch %d: stopping", cfg.max_minutes, epoch)

    # ---- outputs
    if val_ppl is None and d.is_main:  # nothing left to train (resumed a finished run)
        val_ppl = _validate(model, val_ids, cfg, d)
    result = {"val_ppl": _or_none(val_ppl), "epochs": epoch, "steps": step,
              "tokens_per_s": tokens_trained / train_time if train_time else None,
              "wall_s": elapsed_before + time.perf_counter() - t_start, "world_size": d.world_size,
              "device": str(d.device) if d.device.type == "cpu" else torch.cuda.get_device_name(d.device),
              "finished": epoch >= cfg.epochs}
    if d.is_main:
        if cfg.keep_best and best["model"] is not None and best["val_ppl"] < (val_ppl if val_ppl is not None else math.inf):
            # Early stopping's choice: ship the epoch that generalised best, not the last one.
            model.load_state_dict(best["model"])
            log.info("keeping the weights of epoch %d (val ppl %.4f; last epoch %.4f)", best["epoch"],
                     best["val_ppl"], val_ppl)
            result["val_ppl"] = best["val_ppl"]
        result["best_epoch"] = best["epoch"] if best["model"] is not None else epoch
        write_outputs(run_dir, model, model_cfg, cfg, vocab_size, result)
    if d.distributed:
        dist.barrier()  # nobody exits (tearing down the group) while rank 0 still writes
    return result


def _validate(model, val_ids, cfg, d) -> float:
    if len(val_ids) < 2:
        return math.nan
    return perplexity(model, val_ids, batch_size=cfg.batch_size, num_steps=cfg.num_steps, device=d.device)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf  # a diverging (but finite) loss has no float ppl


def _or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _broadcast_object(obj, d: Dist):
    if not d.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=d.device if d.device.type == "cuda" else None)
    return box[0]


def check_inputs(train_ids, val_ids, vocab_size, cfg: TrainConfig, d: Dist) -> None:
    """Fail early, and as do-not-retry, on inputs that cannot work."""
    if cfg.batch_size % d.world_size:
        raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by the "
                          f"{d.world_size} ranks (it is the global batch)")
    if num_batches(len(train_ids), cfg.batch_size, cfg.num_steps, cfg.sampling) < 1:
        raise ConfigError(f"the training split ({len(train_ids)} tokens) is too short for one "
                          f"batch of {cfg.batch_size} x {cfg.num_steps} tokens")
    for name, ids in (("train", train_ids), ("val", val_ids)):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise DatasetError(f"{name} split must be 1-D integer token ids, got {ids.dtype} {ids.shape}")
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise DatasetError(f"{name} split has token ids outside [0, {vocab_size}): "
                               f"[{ids.min()}, {ids.max()}]")


# ----------------------------------------------------------------------------- outputs


def emit(metrics_uri: str, event: dict[str, Any]) -> None:
    """One JSON line to stdout (an orchestrator forwards it) and to metrics.jsonl."""
    line = json.dumps(event)
    print(line, flush=True)
    if storage.is_local(metrics_uri):
        with open(storage.local_path(metrics_uri), "a", encoding="utf-8") as f:
            f.write(line + "\n")
    else:  # object stores cannot append
        old = storage.read_bytes(metrics_uri) if storage.exists(metrics_uri) else b""
        storage.write_bytes_atomic(metrics_uri, old + (line + "\n").encode())


def _truncate_metrics(metrics_uri: str, epoch: int) -> None:
    """Drop epoch lines past the checkpoint we resume from: they will be trained again."""
    if not storage.exists(metrics_uri):
        return
    lines = storage.read_bytes(metrics_uri).decode().splitlines()
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("epoch", 0) <= epoch]
    storage.write_bytes_atomic(metrics_uri, "".join(ln + "\n" for ln in kept).encode())


def write_outputs(run_dir, model, model_cfg: ModelConfig, cfg: TrainConfig, vocab_size: int,
                  result: dict) -> None:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    storage.write_bytes_atomic(storage.join(run_dir, "model.pt"), buffer.getbuffer())
    storage.write_json_atomic(storage.join(run_dir, "model_config.json"),
                              {**model_cfg.model_dump(mode="json"), "vocab_size": vocab_size})
    storage.write_json_atomic(storage.join(run_dir, "train_config.json"), cfg.model_dump(mode="json"))
    storage.write_json_atomic(storage.join(run_dir, "result.json"), result)


def write_failure(run_dir: str, e: PipelineError) -> None:
    reason = next((r for cls, r in FAILURE_REASONS.items() if isinstance(e, cls)), type(e).__name__)
    info = {"reason": reason, "retryable": bool(e.retryable), "error": type(e).__name__, "message": str(e)}
    if getattr(e, "step", None) is not None:
        info["step"] = e.step
    try:
        storage.write_json_atomic(storage.join(run_dir, "FAILED.json"), info)
    except Exception:  # the failure itself matters more than recording it
        log.exception("could not write FAILED.json")


def _remove(uri: str) -> None:
    if storage.exists(uri):
        fs, path = storage.filesystem(uri)
        fs.rm(path)


# -------------------------------------------------------------------------------- CLI


def load_dataset(uri: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(train ids, val ids, vocab size) of a prepared dataset.

    ``*.npz`` files with ``train``, ``val`` and ``vocab_size`` arrays are read
    directly (tests, quick experiments); anything else goes to ``pipeline.shards``.
    """
    if uri.endswith(".npz"):
        try:
            with np.load(storage.local_path(uri)) as z:
                return z["train"], z["val"], int(z["vocab_size"])
        except (OSError, KeyError, ValueError) as e:
            raise DatasetError(f"dataset {uri} is unusable: {e}") from None
    from pipeline.shards import open_dataset

    ds = open_dataset(uri)
    return np.asarray(ds.split("train")), np.asarray(ds.split("val")), int(ds.vocab_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="output directory (local path or fsspec URL)")
    p.add_argument("--dataset", required=True, help="prepared dataset URI (the config's data section is ignored)")
    p.add_argument("--config", required=True, help="RunConfig YAML with model/train sections")
    p.add_argument("--checkpoint-dir", help="default: RUN_DIR/checkpoints")
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    d = None
    try:
        run_cfg = load_config(RunConfig, args.config)
        d = setup_distributed(run_cfg.train.device)
        train_ids, val_ids, vocab_size = load_dataset(args.dataset)
        train(train_ids, val_ids, vocab_size, run_cfg.model, run_cfg.train, args.run_dir,
              checkpoint_dir=args.checkpoint_dir, dist_info=d)
        return EXIT_OK
    except PipelineError as e:
        log.error("%s: %s", type(e).__name__, e)
        if rank == 0 and not getattr(e, "recorded", False):
            write_failure(args.run_dir, e)  # failures before train() got going
        return EXIT_FAILED if e.retryable else EXIT_DO_NOT_RETRY
    finally:
        if d is not None and d.distributed and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
