"""Training checkpoints in a directory given as a URI (a local path or any fsspec URL).

A checkpoint is one file ``ckpt-<epoch>-<step>.pt`` (zero-padded, so names sort
in training order) holding a plain dict of tensors and Python values:

    format, epoch, step          completed epochs and optimizer steps so far
    model, optimizer, scheduler  state_dicts (the model's unwrapped from DDP)
    hidden                       sequential sampling, mid-epoch only: the global
                                 recurrent state (num_layers, batch_size, H) per
                                 part, so each rank can take back its own rows
    epoch_stats                  loss / grad-norm sums and steps since the last evaluation
                                 (by default: of the epoch so far)
    rng                          a budget's stop between evaluations only: every rank's
                                 dropout RNG state (elsewhere it is reseeded)
    elapsed_s                    training time so far (for max_minutes)
    model_config, train_config, vocab_size, train_tokens, world_size

Only rank 0 writes, to a temporary name that is then renamed into place, so a
crash never leaves a file that looks complete. Loading uses
``torch.load(weights_only=True)`` only: a checkpoint is data, never code. The
data-loader position and dropout RNG are not stored: both are pure functions of
(seed, epoch, step, rank), see ``pipeline.training.train``. ``checkpoint_payload`` is what a
training run (``pipeline.training.run_state.Run``) saves, ``restore`` loads it back into one.
"""

from __future__ import annotations

import io
import logging
import re
from typing import TYPE_CHECKING, Any

import torch

from pipeline import storage
from pipeline.config import ModelConfig, TrainConfig
from pipeline.errors import CheckpointError

if TYPE_CHECKING:
    from pipeline.training.run_state import Run

log = logging.getLogger(__name__)

FORMAT = 1
NAME_RE = re.compile(r"^ckpt-(\d+)-(\d+)\.pt$")
REQUIRED = {
    "format": int, "epoch": int, "step": int, "model": dict, "optimizer": dict, "scheduler": dict,
    "epoch_stats": dict, "elapsed_s": float, "model_config": dict, "train_config": dict,
    "vocab_size": int, "world_size": int,
}
# Train-config keys that may change between a checkpoint and the run resuming it:
# they decide how long and how often, not what a step computes.
RESUMABLE_CHANGES = {"epochs", "max_minutes", "max_steps", "patience", "checkpoint_every_steps", "keep_checkpoints", "device",
                     "cuda_graphs"}


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt-{epoch:06d}-{step:010d}.pt"


def list_checkpoints(directory: str) -> list[str]:
    """URIs of the checkpoints in ``directory``, oldest first (by epoch, then step)."""
    fs, path = storage.filesystem(directory)
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = NAME_RE.match(name)
        if m:
            found.append((int(m[1]), int(m[2]), storage.join(directory, name)))
    return [uri for _, _, uri in sorted(found)]


def save_checkpoint(directory: str, payload: dict[str, Any], keep: int) -> str:
    """Write ``payload`` atomically as the next checkpoint, then prune all but the newest ``keep``."""
    uri = storage.join(directory, checkpoint_name(payload["epoch"], payload["step"]))
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    try:
        storage.write_bytes_atomic(uri, buffer.getbuffer())  # the older ones go only once it is written
    except OSError as e:
        if not storage.is_disk_full(e):
            raise
        raise storage.unwritable(directory, f"the checkpoint {uri} (the last good one is kept)", e) from None
    for old in list_checkpoints(directory)[:-keep]:
        fs, path = storage.filesystem(old)
        fs.rm(path)
    return uri


def load_checkpoint(uri: str) -> dict[str, Any]:
    """Load and structurally verify one checkpoint; any problem is a CheckpointError."""
    try:
        data = storage.read_bytes(uri)
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, bad zip, forbidden type: all mean "corrupt"
        raise CheckpointError(f"checkpoint {uri} cannot be loaded: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {uri} holds a {type(ckpt).__name__}, not a dict")
    for key, kind in REQUIRED.items():
        if not isinstance(ckpt.get(key), kind):
            raise CheckpointError(f"checkpoint {uri}: {key!r} is missing or not a {kind.__name__}")
    if ckpt["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {uri} has format {ckpt['format']}, expected {FORMAT}")
    bad = [k for k, v in ckpt["model"].items() if not isinstance(v, torch.Tensor)]
    if bad or not ckpt["model"]:
        raise CheckpointError(f"checkpoint {uri}: model state is empty or has non-tensors {bad[:3]}")
    rng = ckpt.get("rng")
    if rng is not None and not (isinstance(rng, (list, tuple)) and all(
            isinstance(r, dict) and all(isinstance(t, torch.Tensor) for t in r.values()) for r in rng)):
        raise CheckpointError(f"checkpoint {uri}: 'rng' must be a list of dicts of tensors")
    hidden = ckpt.get("hidden")
    if hidden is not None and not (isinstance(hidden, (list, tuple))
                                   and all(isinstance(h, torch.Tensor) for h in hidden)):
        raise CheckpointError(f"checkpoint {uri}: 'hidden' must be a list of tensors")
    return ckpt


def latest_valid(directory: str) -> tuple[dict[str, Any], str] | None:
    """The newest checkpoint that loads, and its URI; None if there is none.

    A corrupt newer file (a torn write on a filesystem without atomic rename, a
    bad disk) is skipped with a warning naming it, and the previous one is used.
    """
    for uri in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(uri), uri
        except CheckpointError as e:
            log.warning("skipping corrupt checkpoint %s: %s", uri, e)
    return None


def check_compatible(ckpt: dict[str, Any], uri: str, *, model_config: dict, train_config: dict,
                     vocab_size: int, train_tokens: int | None = None) -> None:
    """Raise CheckpointError unless ``ckpt`` was written by a run with the same model, training
    math and data (vocabulary, training-split length: the sampler positions depend on it)."""
    problems = []
    if ckpt["vocab_size"] != vocab_size:
        problems.append(f"vocab_size {ckpt['vocab_size']} != {vocab_size}")
    if train_tokens is not None and ckpt.get("train_tokens", train_tokens) != train_tokens:
        problems.append(f"training split of {ckpt['train_tokens']} tokens != {train_tokens}")
    for section, cls, saved, current, ignore in (
            ("model", ModelConfig, ckpt["model_config"], model_config, set()),
            ("train", TrainConfig, ckpt["train_config"], train_config, RESUMABLE_CHANGES)):
        saved = {**cls().model_dump(mode="json"), **saved}  # keys added since then: their defaults
        for key in sorted((saved.keys() | current.keys()) - ignore):
            if saved.get(key) != current.get(key):
                problems.append(f"{section}.{key} {saved.get(key)!r} != {current.get(key)!r}")
    if problems:
        raise CheckpointError(
            f"checkpoint {uri} was written by a different run configuration "
            f"(checkpoint vs current: {'; '.join(problems)}); use a fresh run directory "
            f"or the original configuration")


def checkpoint_payload(run: Run, epoch_stats: dict[str, float], hidden_parts, rng=None) -> dict[str, Any]:
    """What a checkpoint of ``run`` holds now (see the module docstring); ``hidden_parts``: the
    gathered recurrent state of a mid-epoch checkpoint under sequential sampling, else None;
    ``rng``: every rank's RNG state, where the run resuming it must not reseed."""
    return {"epoch": run.epoch, "step": run.step, "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.schedule.state_dict(),
            "scaler": run.mp.state_dict(), "rng": rng,
            "hidden": hidden_parts, "epoch_stats": epoch_stats, "best": run.best,
            "averaging": run.averager.state_dict() if run.averager else None,
            "early_stopping": run.early_stopping.state_dict(),
            "elapsed_s": run.elapsed(), "model_config": run.model_cfg.model_dump(mode="json"),
            "train_config": run.cfg.model_dump(mode="json"), "vocab_size": run.vocab_size,
            "train_tokens": len(run.train_ids), "world_size": run.d.world_size}


def restore(run: Run, ckpt: dict[str, Any], uri: str) -> None:
    """Check that checkpoint ``ckpt`` (at ``uri``) fits ``run``, then load it into ``run``."""
    check_compatible(ckpt, uri, model_config=run.model_cfg.model_dump(mode="json"),
                     train_config=run.cfg.model_dump(mode="json"), vocab_size=run.vocab_size,
                     train_tokens=len(run.train_ids))
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.schedule.load_state_dict(ckpt["scheduler"])
    run.mp.load_state_dict(ckpt.get("scaler"))
    run.epoch, run.step, run.elapsed_before = ckpt["epoch"], ckpt["step"], ckpt["elapsed_s"]
    run.hidden, run.rng = ckpt.get("hidden"), ckpt.get("rng")
    # "steps" is absent from checkpoints written when every stretch was an epoch
    run.saved_stretch = {"steps": run.step - run.epoch * run.steps_per_epoch, **ckpt["epoch_stats"]}
    run.best, run.last_checkpoint = ckpt.get("best") or run.best, uri
    if run.averager:
        run.averager.load_state_dict(ckpt["averaging"])
    if ckpt.get("early_stopping"):  # absent from checkpoints written before early stopping
        run.early_stopping.load_state_dict(ckpt["early_stopping"])
