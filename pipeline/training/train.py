"""Train a recurrent language model: one process, or many under torchrun (DDP).

    python -m pipeline.training.train --run-dir DIR --dataset URI --config RUN.yaml
    torchrun --nproc-per-node 2 -m pipeline.training.train --run-dir DIR --dataset URI --config RUN.yaml

``_train()`` is the whole loop on one screen: ``start_run`` (model, optimizer,
schedule), ``_resume`` (newest valid checkpoint), then ``_train_epoch`` (which ends in
``_end_epoch``) until done or stopped, and ``_finish`` (the shipped weights, result.json).
Their shared state is one ``Run``. Neighbours: ``run_state`` (``Run``, ``start_run``,
``reseed``), ``distributed`` (ranks and collectives), ``optim`` (optimizer, schedule,
clipping), ``divergence``, ``precision``, ``checkpoint`` (files, and a run's payload and
restore), ``metrics`` (metrics.jsonl), ``rundir`` (outputs, FAILED.json), ``training_data``
(loading and checking the splits), ``processes`` (exiting with the launcher), ``progress`` (rank 0's
throttled line for a live display). Things worth knowing:

* Batches. ``cfg.batch_size`` is global: every rank draws the same global batch
  from the sampler's seeded generator and keeps its own rows, so N ranks with
  B/N rows each compute exactly what one process with B rows does (DDP averages
  the gradients; every rank holds the same number of tokens).
* Determinism. Model init is seeded by ``cfg.seed``; the data order is a function
  of (seed, epoch); the dropout RNG is reseeded from (seed, epoch, step, rank) at
  every epoch start and checkpoint. So a checkpoint needs no generator state and
  a resumed run repeats the uninterrupted one exactly. The AWD-LSTM masks
  (``pipeline.model.regularization``) and the variable BPTT lengths (``sampling``) come
  from the same streams.
* Evaluations. At each epoch's end, or every ``eval_every_steps`` (``_evaluate``): the
  training figures of the steps since the last one (a ``Stretch``), a validation, early
  stopping, keep_best, the plateau schedule, the NT-ASGD trigger, a metrics line and a
  checkpoint. ``max_steps`` and ``max_minutes`` are checked after every step; the one
  that ends a run ends it there, with a validation nothing decides by and a checkpoint
  that also keeps every rank's RNG state (``_final_evaluation``), so a bigger budget
  continues exactly.
* AWD-LSTM's recipe (``TrainConfig``): AR/TAR penalties join the loss (the reported
  train perplexity stays the plain cross-entropy's); under ``nt_asgd`` the averaged
  weights (``averaging.NTAverage``) are validated, kept as best and shipped once the
  trigger fires; ``patience`` ends the run early (``stopping.EarlyStopping``).
* Checkpoints, written by rank 0 at every evaluation and epoch end (and every
  ``checkpoint_every_steps``), are resumed from automatically. Mid-epoch ones
  under sequential sampling carry the recurrent state of every rank's streams.
* Validation is ``pipeline.model.evaluate.perplexity`` with the pipeline's one fixed
  evaluation setting (not the training batch), so ``val_ppl`` here equals what the
  evaluate task, MLflow and the gate report for the same weights.
* Failure. A non-finite gradient norm (identical on every rank after DDP's
  all-reduce, so all ranks stop at the same step with no extra collective; under
  fp16 the loss, as the scaler skips overflowing steps), or a training loss or
  validation perplexity that is NaN or overflows, is divergence: no further
  checkpoint is written, FAILED.json says why (and which checkpoint is kept, or
  "no checkpoint yet"), and the exit code is EXIT_DO_NOT_RETRY. On a GPU the
  check lags a few steps (``divergence``).
* Speed. The step runs under ``train.precision``'s autocast (``precision``). On
  a GPU the split lives on the device (when it fits) and batches are gathered there; the step
  loop syncs with the host only for the progress line and checkpoints.
  Validation is sharded over all ranks (``evaluate``).
* Started by ``pipeline.training.launch``, every rank stops when the launcher is gone.

Outputs in the run directory: checkpoints/, metrics.jsonl (one JSON line per
evaluation, also printed to stdout), model.pt, model_config.json, train_config.json,
result.json; FAILED.json on a failure that retrying cannot fix.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import math
import os
import sys
import time
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import storage
from pipeline.training.checkpoint import checkpoint_payload, latest_valid, load_checkpoint, restore, save_checkpoint
from pipeline.training.cuda_graph import GraphedStep
from pipeline.config import ModelConfig, RunConfig, TrainConfig
from pipeline.config_sources import load_config
from pipeline.training.distributed import (Dist, all_reduce_sum, barrier, broadcast_from_main, broadcast_object,
                                  gather_hidden, setup_distributed, teardown_distributed)
from pipeline.training.divergence import non_finite, with_checkpoint_note
from pipeline.errors import EXIT_DO_NOT_RETRY, EXIT_FAILED, EXIT_OK, NonFiniteLossError, PipelineError
from pipeline.model.evaluate import EVAL_BATCH_SIZE, EVAL_NUM_STEPS, perplexity_from_loss
from pipeline.training.metrics import emit, finite_or_none, print_line, truncate_after
from pipeline.model.models import detach_state
from pipeline.training.optim import clip_grad_norm_
from pipeline.training.processes import exit_now, exit_with_launcher
from pipeline.training.progress import ProgressReporter
from pipeline.model.regularization import activation_penalty
from pipeline.training.run_state import Run, Stretch, reseed, rng_state, set_rng_state, start_run
from pipeline.training.rundir import remove, write_failure, write_outputs
from pipeline.data.sampling import batches, device_batches, rank_rows
from pipeline.data.training_data import check_inputs, load_dataset

log = logging.getLogger("pipeline.training.train")

PROGRESS_EVERY_S = 30.0  # rank 0 logs a progress line this often within a long epoch


# ------------------------------------------------------------------------------- train


def train(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int, model_cfg: ModelConfig,
          cfg: TrainConfig, run_dir: str, *, checkpoint_dir: str | None = None,
          dist_info: Dist | None = None) -> dict[str, Any]:
    """Train (or resume training) and write the run directory. Returns result.json's contents.

    Without ``dist_info`` the process group is set up from the environment (and
    torn down at the end). Raises PipelineError on expected failures, after
    writing FAILED.json.
    """
    d = dist_info or setup_distributed(cfg.device)
    try:
        try:
            return _train(train_ids, val_ids, vocab_size, model_cfg, cfg, run_dir,
                          checkpoint_dir or storage.join(run_dir, "checkpoints"), d)
        except OSError as e:  # metrics, outputs (a checkpoint says so itself)
            if isinstance(e, PipelineError) or not storage.is_disk_full(e):
                raise
            raise storage.unwritable(run_dir, e.filename or "the run's files", e) from None
    except PipelineError as e:
        if d.is_main:
            write_failure(run_dir, e)
        e.recorded = True  # main() need not write FAILED.json again
        raise
    finally:
        if dist_info is None:
            teardown_distributed(d)


def _train(train_ids, val_ids, vocab_size, model_cfg, cfg, run_dir, ckpt_dir, d: Dist) -> dict[str, Any]:
    check_inputs(train_ids, val_ids, vocab_size, cfg, d.world_size)
    run = start_run(train_ids, val_ids, vocab_size, model_cfg, cfg, run_dir, ckpt_dir, d)
    _resume(run)
    if cfg.cuda_graphs:  # after the checkpoint's weights and optimizer state are in place
        run.graphed = GraphedStep(partial(_train_step, run), run.optimizer,
                                  partial(run.model.begin_state, device=d.device), cfg.sampling == "sequential")
    # The budgets count all attempts (steps and training time are saved in checkpoints), and a
    # run that early stopping ended stays ended; both come from the same checkpoint on every rank.
    run.stop = _over_budget(run, run.elapsed_before) or (
        f"patience={cfg.patience}" if run.early_stopping.exhausted else None)
    progress = ProgressReporter(run.d.is_main)  # the live display's line, when a launcher asked for one
    try:
        while run.epoch < cfg.epochs and not run.stop:
            _train_epoch(run, progress)
    except NonFiniteLossError as e:
        raise with_checkpoint_note(e, run.last_checkpoint) from None
    if run.stop and run.epoch < cfg.epochs and d.is_main:
        log.info("%s: stopping at epoch %d step %d", run.stop, run.epoch, run.step)
    return _finish(run)


def _resume(run: Run) -> None:
    """Load the newest valid checkpoint, if any; rank 0 chooses so that all ranks agree. Then wrap in DDP."""
    d, cfg = run.d, run.cfg
    found = latest_valid(run.ckpt_dir) if d.is_main else None
    uri = broadcast_object(found[1] if found else None, d)
    if uri is not None:
        ckpt = found[0] if d.is_main else load_checkpoint(uri)
        restore(run, ckpt, uri)
        if d.is_main:
            log.info("resuming from epoch %d step %d (%s)", run.epoch, run.step, uri)
            print_line(json.dumps({"event": "resume", "epoch": run.epoch, "step": run.step, "checkpoint": uri}))
            truncate_after(run.metrics, run.step)
            if ckpt["world_size"] != d.world_size:
                log.info("checkpoint was written with %d ranks, resuming with %d", ckpt["world_size"], d.world_size)
    elif d.is_main:
        log.info("starting fresh: %d epochs of %d steps, %d rank(s) on %s", cfg.epochs,
                 run.steps_per_epoch, d.world_size, d.device)
        remove(run.metrics)
    if d.distributed:
        run.ddp_model = DDP(run.model, device_ids=[d.device] if d.device.type == "cuda" else None)
    saved = run.saved_stretch if d.is_main else {}  # saved globally: count them once
    run.stretch = Stretch.begin(d.device, saved.get("loss_sum", 0.0), saved.get("norm_sum", 0.0),
                                int(run.saved_stretch.get("steps", 0)))
    run.t_start = time.perf_counter()


def _train_epoch(run: Run, progress: ProgressReporter | None = None) -> None:
    """One epoch, or the rest of one when resuming mid-epoch; a budget or early stopping may end it early.

    After each step: an evaluation when one is due (``_evaluate``), else a checkpoint when
    one is due; then the budgets, which stop the run here (``_final_evaluation``).
    """
    d, cfg = run.d, run.cfg
    progress = progress or ProgressReporter(is_main=False)
    first = run.steps_into_epoch  # batches of this epoch already trained
    state = None
    if first and run.hidden is not None:  # sequential sampling: this rank's rows of every stream
        rows = rank_rows(cfg.batch_size, d.rank, d.world_size)
        state = tuple(h[:, rows].contiguous().to(d.device) for h in run.hidden)
    if first and run.rng is not None and len(run.rng) == d.world_size:
        set_rng_state(run.rng[d.rank], d.device)  # a budget stopped the run here: its streams go on
    else:
        reseed(cfg.seed, run.epoch, run.step, d.rank)
    run.hidden = run.rng = None
    run.ddp_model.train()
    step = run.graphed or partial(_train_step, run)
    t_log = time.perf_counter()
    for X, Y in _epoch_batches(run, first):
        if cfg.sampling == "random":
            state = None  # unrelated windows: start every batch from the zero state
        elif state is not None:
            state = detach_state(state)  # truncated BPTT: keep the values, drop the graph
        loss, norm, state = step(X, Y, state)
        if run.averager:
            run.averager.update()
        run.step += 1
        stretch = run.stretch
        stretch.steps += 1
        stretch.tokens += cfg.batch_size * X.shape[1]  # global, all ranks
        # One launch for both sums; skipped fp16 steps add 0 to the norm's.
        torch._foreach_add_([stretch.loss_sum, stretch.norm_sum],
                            [loss.detach(), norm.nan_to_num(0.0, 0.0, 0.0) if run.mp.scaler else norm])
        # A non-finite value leaves the stretch's running sum non-finite from its step on, so the
        # watch reads the sum (no finiteness kernels per step). fp16 overflows are the scaler's
        # business (the step is skipped): there the loss is watched, not the norm.
        run.watch.push(stretch.loss_sum if run.mp.scaler else stretch.norm_sum, run.step)
        progress.step(run, loss, cfg.batch_size * X.shape[1])
        if run.step % run.steps_per_epoch:  # the epoch's end is _end_epoch's
            evaluated = run.evaluation_due()
            if evaluated:
                _evaluate(run, state)
            elif cfg.checkpoint_every_steps and run.step % cfg.checkpoint_every_steps == 0:
                _checkpoint_mid_stretch(run, state)
            run.stop = run.stop or _over_budget(run, run.elapsed())
            if run.stop:
                if not evaluated:
                    _final_evaluation(run, state)
                return
        if d.is_main and time.perf_counter() - t_log > PROGRESS_EVERY_S:
            t_log = time.perf_counter()
            log.info("epoch %d step %d/%d loss %.4f grad_norm %.3f", run.epoch + 1,
                     run.step - run.epoch * run.steps_per_epoch, run.steps_per_epoch, loss.item(), norm.item())
    _end_epoch(run)


def _train_step(run: Run, X: torch.Tensor, Y: torch.Tensor, state):
    """One optimizer step on a batch: the loss (plain cross-entropy), the global gradient norm
    before clipping, and the state after the batch. What a CUDA graph captures (cuda_graph)."""
    cfg = run.cfg
    loss, state = _forward_backward(run, X, Y, state)  # under DDP, gradients averaged over ranks
    run.mp.unscale_(run.optimizer)  # fp16: clip the true gradients, not the scaled ones
    norm = clip_grad_norm_(run.params, cfg.clip_norm)  # after the all-reduce: the global norm
    if cfg.variable_bptt:  # AWD-LSTM: a shorter window takes a smaller step
        run.schedule.scale_batch(X.shape[1] / cfg.num_steps)
    run.mp.step(run.optimizer)
    return loss, norm, state


def _forward_backward(run: Run, X: torch.Tensor, Y: torch.Tensor, state):
    """One batch: returns the plain cross-entropy (what is reported) and the new state; the
    gradients are those of the loss plus the AR/TAR penalty, when on (averaged over ranks under DDP)."""
    cfg = run.cfg
    regularised = bool(cfg.ar or cfg.tar)
    with run.mp.autocast():
        out = run.ddp_model(X, state, targets=Y, with_activations=regularised)  # the model's head computes the loss
        loss, state = out[0], out[1]
        total = (loss + activation_penalty(*out[2], cfg.ar, cfg.tar)) if regularised else loss
    run.optimizer.zero_grad(set_to_none=True)
    run.mp.backward(total)
    return loss, state


def _epoch_batches(run: Run, first: int):
    """This rank's batches of the current epoch from batch ``first`` on, where the model is."""
    d, cfg = run.d, run.cfg
    kwargs = dict(seed=cfg.seed, epoch=run.epoch, rank=d.rank, world_size=d.world_size, start=first,
                  variable_length=cfg.variable_bptt)
    if run.train_tokens is not None:
        yield from device_batches(run.train_tokens, cfg.batch_size, cfg.num_steps, cfg.sampling, device=d.device,
                                  **kwargs)
        return
    for X, Y in batches(run.train_ids, cfg.batch_size, cfg.num_steps, cfg.sampling, **kwargs):
        yield torch.from_numpy(X), torch.from_numpy(Y)


def _over_budget(run: Run, elapsed: float) -> str | None:
    """The budget (``max_steps``, ``max_minutes``) the run has used up, if any; every rank agrees."""
    cfg = run.cfg
    if cfg.max_steps is not None and run.step >= cfg.max_steps:
        return f"max_steps={cfg.max_steps}"
    if cfg.max_minutes is not None:
        over = elapsed > cfg.max_minutes * 60
        if run.d.distributed:  # each rank has its own clock: rank 0's decides
            over = bool(broadcast_from_main([float(over)], run.d)[0])
        if over:
            return f"max_minutes={cfg.max_minutes:g}"
    return None


def _end_epoch(run: Run) -> None:
    """The epoch's end: an evaluation (by default), else the decay schedule and a checkpoint;
    a final evaluation when a budget or the last epoch ends the run between evaluations."""
    run.epoch += 1
    run.watch.flush()
    due = run.evaluation_due()
    if due:
        _evaluate(run, None, epoch_end=True)
    run.stop = run.stop or _over_budget(run, run.elapsed())
    if not due:
        run.schedule.end_epoch(run.epoch)
        if run.stop or run.epoch == run.cfg.epochs:
            _final_evaluation(run, None)
        else:
            _checkpoint_mid_stretch(run, None)


def _stretch_figures(run: Run) -> tuple[dict[str, float], dict[str, float]]:
    """The stretch's metrics-line figures, and its global sums for a checkpoint; raises on divergence.
    Books the stretch's tokens and seconds of this attempt into the run's totals."""
    run.watch.flush()
    stretch, per_step = run.stretch, run.stretch.steps * run.d.world_size
    loss_sum, norm_sum = all_reduce_sum(torch.stack([stretch.loss_sum, stretch.norm_sum]), run.d).tolist()
    train_ppl = perplexity_from_loss(loss_sum / per_step)
    if not math.isfinite(train_ppl):  # NaN, or a loss so large its perplexity overflows
        raise non_finite(run.step, "training loss/perplexity")
    seconds = time.perf_counter() - stretch.t0
    figures = {"train_ppl": train_ppl, "tokens_per_s": stretch.tokens / seconds if stretch.tokens else None,
               "grad_norm": norm_sum / per_step}
    run.tokens_trained += stretch.tokens
    run.train_time += seconds
    stretch.tokens, stretch.t0 = 0, time.perf_counter()
    return figures, {"loss_sum": loss_sum, "norm_sum": norm_sum, "steps": stretch.steps}


def _validate(run: Run) -> None:
    """``run.val_ppl``: every rank scores its share and gets rank 0's total; raises on divergence."""
    val_ppl = run.validate()
    val_ppl = broadcast_from_main([math.nan if val_ppl is None else val_ppl], run.d)[0]
    run.val_ppl = val_ppl if run.has_validation else None
    run.validated = True
    if run.val_ppl is not None and not math.isfinite(run.val_ppl):  # every rank sees it: all stop
        raise non_finite(run.step, "validation perplexity")


def _metrics_line(run: Run, event: str, figures: dict[str, float], lr: float) -> None:
    line = {"event": event, "epoch": run.epoch, "step": run.step, "train_ppl": figures["train_ppl"],
            "val_ppl": run.val_ppl, "tokens_per_s": figures["tokens_per_s"], "grad_norm": figures["grad_norm"],
            "lr": lr, "elapsed_s": run.elapsed()}
    if event == "eval":  # between epoch ends: where in training, in epochs
        line["epochs"] = run.step / run.steps_per_epoch
    emit(run.metrics, line)


def _evaluate(run: Run, state, *, epoch_end: bool = False) -> None:
    """A scheduled evaluation (an epoch's end, or every eval_every_steps): the stretch's training
    figures and a validation, which early stopping, keep_best, the plateau schedule and the
    NT-ASGD trigger count; a metrics line; a checkpoint; then a new stretch."""
    d, cfg = run.d, run.cfg
    figures, _ = _stretch_figures(run)
    _validate(run)
    # Every rank sees the same val_ppl, so these decisions agree across ranks (without a
    # validation split neither early stopping nor the NT-ASGD trigger has anything to go by).
    if run.val_ppl is not None and run.early_stopping.update(run.val_ppl):
        run.stop = f"no better validation for {cfg.patience} evaluations"
    if run.val_ppl is not None and run.averager and run.averager.observe(run.val_ppl) and d.is_main:
        log.info("NT-ASGD: averaging the weights from step %d on", run.step + 1)
    if d.is_main and cfg.keep_best and run.val_ppl is not None and run.val_ppl < run.best["val_ppl"]:
        run.best = {"val_ppl": run.val_ppl, "epoch": run.epoch, "step": run.step,
                    "model": {k: v.detach().to("cpu", copy=True)
                              for k, v in run.evaluated_model.state_dict().items()}}
    lr = run.schedule.lr  # the rate the stretch trained at
    run.schedule.evaluated(run.val_ppl if run.val_ppl is not None else figures["train_ppl"])
    if epoch_end:
        run.schedule.end_epoch(run.epoch)
    if d.is_main:
        _metrics_line(run, "eval" if run.evaluates_by_steps else "epoch", figures, lr)
    parts = gather_hidden(state, d) if state is not None and cfg.sampling == "sequential" else None
    if d.is_main:
        _checkpoint(run, {"loss_sum": 0.0, "norm_sum": 0.0, "steps": 0}, parts)
    if not epoch_end:
        reseed(cfg.seed, run.epoch, run.step, d.rank)  # as a run resuming here will
    run.stretch = Stretch.begin(d.device)  # its clock starts after validating and checkpointing


def _final_evaluation(run: Run, state) -> None:
    """Where the run ends between scheduled evaluations (a budget; or the last epoch, evaluating
    by steps): a validation and a metrics line that nothing decides by, and a checkpoint from
    which a bigger budget continues exactly as if never stopped (the stretch's sums, the
    recurrent state, every rank's dropout RNG state, taken before validating)."""
    d = run.d
    rng = [rng_state(d.device)]
    if d.distributed:
        rng = [None] * d.world_size
        torch.distributed.all_gather_object(rng, rng_state(d.device))
    parts = gather_hidden(state, d) if state is not None and run.cfg.sampling == "sequential" else None
    figures, sums = _stretch_figures(run)
    _validate(run)
    if d.is_main:
        _metrics_line(run, "eval", figures, run.schedule.lr)
        _checkpoint(run, sums, parts, rng)


def _checkpoint_mid_stretch(run: Run, state) -> None:
    """A checkpoint between evaluations (``checkpoint_every_steps``; an epoch's end when evaluating
    by steps): the stretch's sums so far and, mid-epoch under sequential sampling, the state."""
    run.watch.flush()
    stretch = run.stretch
    sums = all_reduce_sum(torch.stack([stretch.loss_sum, stretch.norm_sum]), run.d).tolist()
    if not math.isfinite(perplexity_from_loss(sums[0] / (stretch.steps * run.d.world_size))):
        raise non_finite(run.step, "training loss/perplexity")
    mid_epoch = run.steps_into_epoch != 0
    parts = gather_hidden(state, run.d) if mid_epoch and run.cfg.sampling == "sequential" else None
    if run.d.is_main:
        _checkpoint(run, {"loss_sum": sums[0], "norm_sum": sums[1], "steps": stretch.steps}, parts)
    reseed(run.cfg.seed, run.epoch, run.step, run.d.rank)  # as a run resuming here will


def _checkpoint(run: Run, stretch_stats: dict[str, float], hidden_parts, rng=None) -> None:
    payload = checkpoint_payload(run, stretch_stats, hidden_parts, rng)
    run.last_checkpoint = save_checkpoint(run.ckpt_dir, payload, keep=run.cfg.keep_checkpoints)
    log.info("checkpoint %s", run.last_checkpoint)


def _finish(run: Run) -> dict[str, Any]:
    """result.json, and on rank 0 the shipped weights: the best evaluation's under keep_best."""
    d = run.d
    if not run.validated:  # nothing left to train (resumed a finished run); every rank: sharded
        run.val_ppl = run.validate()
    result = {"val_ppl": finite_or_none(run.val_ppl), "epochs": run.epoch, "steps": run.step,
              "tokens_per_s": run.tokens_trained / run.train_time if run.train_time else None,
              "wall_s": run.elapsed(), "world_size": d.world_size,
              "device": str(d.device) if d.device.type == "cpu" else torch.cuda.get_device_name(d.device),
              "finished": run.epoch >= run.cfg.epochs, "stopped": None if run.epoch >= run.cfg.epochs else run.stop,
              "eval_batch_size": EVAL_BATCH_SIZE, "eval_num_steps": EVAL_NUM_STEPS}
    if d.is_main:
        shipped = run.evaluated_model
        best, last = run.best, (run.val_ppl if run.val_ppl is not None else math.inf)
        if run.cfg.keep_best and best["model"] is not None and best["val_ppl"] < last:
            # Early stopping's choice: ship the evaluation that generalised best, not the last one.
            shipped.load_state_dict(best["model"])
            log.info("keeping the weights of epoch %d step %d (val ppl %.4f; last %.4f)", best["epoch"],
                     best.get("step", -1), best["val_ppl"], run.val_ppl)
            result["val_ppl"] = best["val_ppl"]
        result["best_epoch"] = best["epoch"] if best["model"] is not None else run.epoch
        result["best_step"] = best.get("step") if best["model"] is not None else run.step
        write_outputs(run.run_dir, shipped, run.model_cfg, run.cfg, run.vocab_size, result)
    barrier(d)  # nobody exits (tearing down the group) while rank 0 still writes
    return result


# -------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.training.train", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="output directory (local path or fsspec URL)")
    p.add_argument("--dataset", required=True, help="prepared dataset URI (the config's data section is ignored)")
    p.add_argument("--config", required=True, help="RunConfig YAML with model/train sections")
    p.add_argument("--checkpoint-dir", help="default: RUN_DIR/checkpoints")
    args = p.parse_args(argv)
    faulthandler.enable()  # a rank that crashes in native code (SIGSEGV, SIGABRT) leaves its Python stack in the log
    exit_with_launcher()  # a trainer whose launcher was killed stops too, instead of training unobserved
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
        code = EXIT_OK
    except PipelineError as e:
        log.error("%s: %s", type(e).__name__, e)
        if rank == 0 and not getattr(e, "recorded", False):
            write_failure(args.run_dir, e)  # failures before train() got going
        code = EXIT_FAILED if e.retryable else EXIT_DO_NOT_RETRY
    finally:
        teardown_distributed(d)
    return code


if __name__ == "__main__":
    exit_code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo's worker threads may still be releasing the last collective's tensors when the
        # interpreter finalizes; such a thread cannot take the GIL, is unwound, and
        # std::terminate aborts the rank (SIGABRT after a finished run, seen under CPU load).
        # Everything is written and the group torn down by now: leave without finalizing.
        exit_now(exit_code)
    sys.exit(exit_code)
