"""AWD-LSTM's recipe under torchrun (gloo, 2 ranks).

* Without dropout masks, 2 ranks equal one process with the whole batch: AR/TAR,
  variable BPTT lengths (drawn from the epoch's stream, the same on every rank), the
  NT-ASGD trigger and average, early stopping all see the same figures.
* Dropout masks are drawn per rank (the trainer seeds each rank's RNG with its rank),
  so with them 2 ranks are not one process; they are deterministic and resume exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.training.checkpoint import list_checkpoints, load_checkpoint
from pipeline.config import ModelConfig, TrainConfig
from pipeline.training.distributed import Dist
from pipeline.training.launch import launch_training
from pipeline.training.train import train
from tests.test_train import child_env, corpus, epochs_of, one_thread, weights, write_inputs  # noqa: F401

# Small enough to overfit, so the NT-ASGD trigger fires (at epoch 7) within the run.
TOKENS = 2000
MODEL = dict(cell="gru", hidden_size=128, embed_size=16, init="default")
MASKED = dict(cell="lstm", hidden_size=32, embed_size=16, num_layers=2, init="default", dropout_input=0.1,
              dropout_between=0.1, dropout_output=0.1, dropout_embedding=0.05, weight_drop=0.2)
TRAIN = dict(epochs=8, optimizer="nt_asgd", nt_asgd_window=1, lr=2.0, batch_size=8, num_steps=20, ar=1.0, tar=1.0,
             variable_bptt=True, patience=3, checkpoint_every_steps=10, keep_checkpoints=100)

pytestmark = pytest.mark.slow


def launch(run_dir: Path, inputs: tuple[str, str]) -> None:
    result = launch_training(str(run_dir), *inputs, nproc=2, env=child_env())
    assert result.result["world_size"] == 2


def test_two_ranks_equal_one_process_with_every_deterministic_recipe(tmp_path):
    inputs = write_inputs(tmp_path / "inputs", MODEL, TRAIN, TOKENS)
    launch(tmp_path / "ddp", inputs)
    tr, va, vocab = corpus(TOKENS)
    train(tr, va, vocab, ModelConfig(**MODEL), TrainConfig(**TRAIN), str(tmp_path / "one"), dist_info=Dist())
    ddp, one = epochs_of(tmp_path / "ddp"), epochs_of(tmp_path / "one")
    assert len(ddp) == len(one) == TRAIN["epochs"]
    for a, b in zip(ddp, one):
        assert a["train_ppl"] == pytest.approx(b["train_ppl"], rel=1e-5)
        assert a["val_ppl"] == pytest.approx(b["val_ppl"], rel=1e-5)
    averaging = load_checkpoint(list_checkpoints(str(tmp_path / "ddp" / "checkpoints"))[-1])["averaging"]
    assert averaging["triggered_at"] is not None  # the averaging was part of what matched
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_ranks_with_dropout_masks_resume_exactly_mid_epoch(tmp_path):
    inputs = write_inputs(tmp_path / "inputs", MASKED, TRAIN, TOKENS)
    launch(tmp_path / "ref", inputs)
    mids = [u for u in list_checkpoints(str(tmp_path / "ref" / "checkpoints"))
            if load_checkpoint(u)["hidden"] is not None and load_checkpoint(u)["epoch"] == 3]
    assert mids, "no mid-epoch checkpoint in epoch 4"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(mids[0], tmp_path / "run" / "checkpoints")
    launch(tmp_path / "run", inputs)
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed_epochs = [e["val_ppl"] for e in epochs_of(tmp_path / "run")]
    assert resumed_epochs == [e["val_ppl"] for e in epochs_of(tmp_path / "ref")][3:]  # epochs 4 on
    config = yaml.safe_load(Path(inputs[1]).read_text())
    assert config["model"]["weight_drop"] == 0.2  # the masks were on
