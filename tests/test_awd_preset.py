"""The ptb-word-awd preset (AWD-LSTM on Penn Treebank, a GPU recipe): its first epochs on a fixture.

The real recipe (3 x 1150 LSTM, 500 epochs) needs a GPU for days; here its data stage and its
whole training recipe (every AWD-LSTM regulariser, NT-ASGD, variable BPTT) run on the
PTB-format fixture, with the model and the batch shrunk to CPU size.
"""

from __future__ import annotations

import math

from pipeline.training.checkpoint import list_checkpoints, load_checkpoint
from pipeline.config import RunConfig, parse_config
from pipeline.config_sources import read_raw
from pipeline.training.metrics import read_epochs
from pipeline.data.prepare import prepare_dataset
from pipeline.training.train import train
from tests.test_standard_corpora import PTB, preset_config

CPU_SIZE = {"model.hidden_size": 24, "model.embed_size": 12, "train.batch_size": 4, "train.num_steps": 12,
            "train.epochs": 3, "train.nt_asgd_window": 1, "train.checkpoint_every_steps": None,
            "train.device": "cpu"}


def test_the_recipe_is_the_papers():
    cfg = parse_config(RunConfig, read_raw("ptb-word-awd"))
    m, t = cfg.model, cfg.train
    assert (m.cell, m.num_layers, m.hidden_size, m.embed_size) == ("lstm", 3, 1150, 400)
    assert (m.dropout_input, m.dropout_between, m.dropout_output, m.dropout_embedding, m.weight_drop) == \
        (0.4, 0.25, 0.4, 0.1, 0.5)
    assert (t.optimizer, t.nt_asgd_window, t.lr, t.clip_norm, t.weight_decay, t.ar, t.tar) == \
        ("nt_asgd", 5, 30.0, 0.25, 1.2e-6, 2.0, 1.0)
    assert (t.batch_size, t.num_steps, t.variable_bptt, t.seed) == (20, 70, True, 141)
    assert [s.split for s in cfg.data.sources] == ["train", "val", "test"]


def test_first_epochs_on_the_fixture(tmp_path, store, monkeypatch):
    monkeypatch.setenv("RNNLM_NUM_THREADS", "1")
    cfg = preset_config("ptb-word-awd", PTB, **CPU_SIZE)
    ds = prepare_dataset(cfg.data, store)
    result = train(ds.split("train"), ds.split("val"), ds.vocab_size, cfg.model, cfg.train, str(tmp_path / "run"))
    epochs = read_epochs(str(tmp_path / "run"))
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and result["epochs"] == 3
    assert math.isfinite(result["val_ppl"]) and 1 < result["val_ppl"] < 10 * ds.vocab_size  # learning, not diverged
    last = load_checkpoint(list_checkpoints(str(tmp_path / "run" / "checkpoints"))[-1])
    assert len(last["averaging"]["history"]) == 3  # NT-ASGD watched every epoch
