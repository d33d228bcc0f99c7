"""A training run's directory: the files that say what it produced, or why it failed.

    checkpoints/       pipeline.training.checkpoint
    metrics.jsonl      pipeline.training.metrics
    model.pt, model_config.json, train_config.json, result.json    write_outputs (rank 0, at the end)
    FAILED.json        write_failure: the verdict of a failure retrying cannot fix
"""

from __future__ import annotations

import io
import json
import logging

import torch

from pipeline import storage
from pipeline.config import ModelConfig, TrainConfig
from pipeline.errors import CheckpointError, ConfigError, DatasetError, NonFiniteLossError, PipelineError
from pipeline.training.metrics import print_line

log = logging.getLogger(__name__)

FAILED_FILE = "FAILED.json"
FAILURE_REASONS = {NonFiniteLossError: "non_finite_loss", ConfigError: "bad_config",
                   DatasetError: "bad_dataset", CheckpointError: "bad_checkpoint"}


def write_outputs(run_dir: str, model: torch.nn.Module, model_cfg: ModelConfig, cfg: TrainConfig,
                  vocab_size: int, result: dict) -> None:
    """The finished run: weights, configs, and result.json last (its presence means "done")."""
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
    print_line(json.dumps({"event": "failed", **info}))  # the launcher's copy, should FAILED.json not fit
    try:
        storage.write_json_atomic(storage.join(run_dir, FAILED_FILE), info)
    except Exception:  # the failure itself matters more than recording it
        log.exception("could not write FAILED.json")


def remove(uri: str) -> None:
    """Delete the file ``uri`` if it exists."""
    if storage.exists(uri):
        fs, path = storage.filesystem(uri)
        fs.rm(path)
