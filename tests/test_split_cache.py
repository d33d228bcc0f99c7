"""The per-host split cache (pipeline.data.split_cache): one verified .npy per split, written
once under a lock, memory-mapped by every rank; two ranks on it train what they train in memory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import DataConfig
from pipeline.data.prepare import prepare_dataset
from pipeline.data.split_cache import cache_root, mapped_split, split_key
from pipeline.data.training_data import load_dataset
from pipeline.errors import DatasetError
from tests.test_train import child_env, one_thread, weights  # noqa: F401


@pytest.fixture
def prepared(store):
    return prepare_dataset(DataConfig(tokens_per_shard=20_000), store)


def cached_file(ds, split: str) -> Path:
    return cache_root() / split_key(ds.manifest, split) / f"{split}.npy"


def test_training_split_is_a_map_of_one_cached_copy(prepared):
    train, val, vocab_size = load_dataset(prepared.uri)
    assert isinstance(train, np.memmap) and not train.flags.writeable
    assert np.array_equal(train, prepared.split("train")) and np.array_equal(val, prepared.split("val"))
    assert train.dtype == np.dtype(prepared.manifest["dtype"]) and vocab_size == prepared.vocab_size
    path = cached_file(prepared, "train")
    assert Path(train.filename) == path
    stamp = path.stat().st_mtime_ns
    again, _, _ = load_dataset(prepared.uri)  # written once: the next rank (or run) maps the same file
    assert path.stat().st_mtime_ns == stamp and np.array_equal(again, train)
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_a_damaged_cache_file_is_rewritten(prepared):
    expected = prepared.split("train")
    load_dataset(prepared.uri)
    path = cached_file(prepared, "train")
    with open(path, "r+b") as f:  # a torn copy: the header promises more than the file holds
        f.truncate(path.stat().st_size // 2)
    assert np.array_equal(mapped_split(prepared, "train"), expected)
    path.with_suffix(".json").write_text('{"key": "someone else\'s"}')  # a stamp that does not match
    assert np.array_equal(mapped_split(prepared, "train"), expected)


def test_a_corrupt_shard_fails_and_leaves_no_cache_file(prepared):
    shard = Path(prepared.uri) / prepared.manifest["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="sha256"):
        load_dataset(prepared.uri)
    directory = cached_file(prepared, "train").parent
    assert not [p.name for p in directory.iterdir() if p.suffix in (".npy", ".json") or ".tmp-" in p.name]


@pytest.mark.slow
def test_an_object_store_dataset_is_cached_locally(s3_root):
    from pipeline.config import SplitConfig

    ds = prepare_dataset(DataConfig(splits=SplitConfig(max_tokens=6000), tokens_per_shard=1000), s3_root)
    train, val, _ = load_dataset(ds.uri)
    assert isinstance(train, np.memmap) and Path(train.filename) == cached_file(ds, "train")
    assert np.array_equal(train, ds.split("train")) and np.array_equal(val, ds.split("val"))


@pytest.mark.slow
def test_two_ranks_on_the_mapped_split_train_what_they_train_in_memory(prepared, tmp_path):
    from pipeline.training.launch import launch_training

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"cell": "gru", "hidden_size": 32, "embed_size": 16, "dropout": 0.2},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 1.0, "checkpoint_every_steps": 30}}))
    in_memory = tmp_path / "data.npz"
    np.savez(in_memory, train=prepared.split("train"), val=prepared.split("val"), vocab_size=prepared.vocab_size)
    env = {**child_env(), "RNNLM_SPLIT_CACHE": os.environ["RNNLM_SPLIT_CACHE"]}
    mapped = launch_training(str(tmp_path / "mapped"), prepared.uri, str(config), nproc=2, env=env)
    held = launch_training(str(tmp_path / "held"), str(in_memory), str(config), nproc=2, env=env)
    assert mapped.result["world_size"] == held.result["world_size"] == 2
    assert cached_file(prepared, "train").exists()
    a, b = weights(tmp_path / "mapped"), weights(tmp_path / "held")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cache_that_cannot_be_written_is_a_one_line_config_error(prepared, tmp_path, monkeypatch):
    from pipeline.errors import ConfigError

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("RNNLM_SPLIT_CACHE", str(blocker / "splits"))
    with pytest.raises(ConfigError, match=r"split cache .*a-file/splits/\w+: cannot write there .*set RNNLM_SPLIT_CACHE"):
        load_dataset(prepared.uri)
