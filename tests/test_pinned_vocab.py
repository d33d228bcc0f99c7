"""``data.vocab.pinned``: a growing corpus keeps the vocabulary of an earlier dataset."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from pipeline.config import DataConfig, parse_config
from pipeline.errors import ConfigError, DatasetError
from pipeline.data.prepare import prepare_dataset
from pipeline.data.tokenizer import UNK, tokenize

NIGHT_1 = "the time traveller was expounding a recondite matter to us\nhis grey eyes shone and twinkled\n" * 4
NIGHT_2 = NIGHT_1 + "the fire burned brightly and the soft radiance of the incandescent lights\n"
WORD = {"level": "word", "normalizer": "lower"}


def corpus(tmp_path: Path, text: str, name: str = "corpus.txt") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def config(url: str, **vocab) -> DataConfig:
    return DataConfig.model_validate({"sources": [{"url": url}], "tokenizer": WORD, "vocab": vocab,
                                      "splits": {"train": 0.8, "val": 0.1, "test": 0.1}})


def test_pinned_vocabulary_is_reused_and_new_words_become_unk(tmp_path, store):
    first = prepare_dataset(config(corpus(tmp_path, NIGHT_1)), store)
    url = corpus(tmp_path, NIGHT_2, "grown.txt")
    pinned = prepare_dataset(config(url, pinned=first.uri), store)
    free = prepare_dataset(config(url), store)

    assert pinned.vocab.tokens == first.vocab.tokens != free.vocab.tokens
    words = tokenize(NIGHT_2, config(url).tokenizer)
    ids = [i for s in ("train", "val", "test") for i in pinned.split(s).tolist()]
    assert pinned.vocab.decode(ids) == [w if w in first.vocab.index else UNK for w in words]
    assert "incandescent" not in pinned.vocab.index and UNK not in words
    assert pinned.vocab.counts[0] == sum(w not in first.vocab.index for w in words)  # <unk> counts what it absorbed
    assert pinned.dataset_id != free.dataset_id


def test_the_dataset_id_follows_the_pinned_content_not_its_uri(tmp_path, store):
    first = prepare_dataset(config(corpus(tmp_path, NIGHT_1)), store)
    other = prepare_dataset(config(corpus(tmp_path, NIGHT_2, "other.txt")), store)
    copy = tmp_path / "elsewhere" / "vocab.parquet"
    copy.parent.mkdir()
    shutil.copy(Path(first.uri) / "vocab.parquet", copy)
    sha = hashlib.sha256(copy.read_bytes()).hexdigest()
    url = corpus(tmp_path, NIGHT_2, "grown.txt")

    by_dir = prepare_dataset(config(url, pinned=first.uri), store)
    by_file = prepare_dataset(config(url, pinned={"uri": str(copy), "sha256": sha}), store)
    by_other = prepare_dataset(config(url, pinned=other.uri), store)
    assert by_dir.dataset_id == by_file.dataset_id != by_other.dataset_id
    assert by_file.vocab.tokens == first.vocab.tokens


def test_a_pinned_vocabulary_is_verified(tmp_path, store):
    first = prepare_dataset(config(corpus(tmp_path, NIGHT_1)), store)
    url = corpus(tmp_path, NIGHT_2, "grown.txt")
    with pytest.raises(DatasetError, match="sha256"):
        prepare_dataset(config(url, pinned={"uri": first.uri, "sha256": "0" * 64}), store)
    with pytest.raises(DatasetError, match="sha256"):
        prepare_dataset(config(url, pinned={"uri": str(Path(first.uri) / "vocab.parquet"), "sha256": "0" * 64}), store)
    with pytest.raises(DatasetError, match="no-such-dataset"):
        prepare_dataset(config(url, pinned=str(tmp_path / "no-such-dataset")), store)
    char_level = DataConfig.model_validate({"sources": [{"url": url}], "vocab": {"pinned": first.uri}})
    with pytest.raises(ConfigError, match="vocab.pinned.*tokenized with"):
        prepare_dataset(char_level, store)  # a word vocabulary does not fit characters
    assert [p.name for p in (Path(store) / "datasets").iterdir()] == [Path(first.uri).name]  # nothing half-written


def test_pinned_excludes_settings_that_build_a_vocabulary():
    with pytest.raises(ConfigError, match="vocab.pinned fixes the vocabulary"):
        parse_config(DataConfig, {"vocab": {"pinned": "/some/dataset", "min_freq": 2}})
    cfg = parse_config(DataConfig, {"vocab": {"pinned": "/some/dataset"}})
    assert cfg.vocab.pinned.uri == "/some/dataset" and cfg.vocab.pinned.sha256 is None
    assert DataConfig.model_validate(cfg.model_dump(mode="json")) == cfg


# ------------------------------------------------ --pin-vocab champion (pipeline.registry.champion_vocab)


def run_config(url: str, **vocab):
    from pipeline.config import RunConfig

    return RunConfig.model_validate({"data": config(url, **vocab).model_dump(mode="json")})


def test_pin_to_champion_without_a_champion_proceeds_unpinned(tmp_path, store):
    from pipeline.registry.champion_vocab import pin_to_champion

    cfg = run_config(corpus(tmp_path, NIGHT_1), min_freq=2)
    assert pin_to_champion(cfg, "rnnlm-nobody", store) == cfg  # no such registered model: no champion yet


def test_pin_to_champion_fails_closed_when_the_registry_cannot_be_read(tmp_path, store):
    from pipeline.registry.champion_vocab import pin_to_champion
    from pipeline.errors import RegistryUnavailableError

    Path(store).mkdir(parents=True)
    (Path(store) / "mlflow.db").write_bytes(b"not a database" * 100)  # unreadable, not "absent"
    with pytest.raises(RegistryUnavailableError) as info:
        pin_to_champion(run_config(corpus(tmp_path, NIGHT_1)), "rnnlm-x", store)
    assert info.value.retryable and "champion" in str(info.value)


def test_pin_to_champion_refuses_a_second_pin(tmp_path, store):
    from pipeline.registry.champion_vocab import pin_to_champion

    first = prepare_dataset(config(corpus(tmp_path, NIGHT_1)), store)
    with pytest.raises(ConfigError, match="both pin"):
        pin_to_champion(run_config(corpus(tmp_path, NIGHT_2, "grown.txt"), pinned=first.uri), "rnnlm-x", store)


def test_pin_to_champion_whose_dataset_is_gone_names_the_champion(tmp_path, store):
    """The champion's dataset was deleted: the error is about the champion (which version, which
    dataset, what to do), not a bare "no dataset at ..."; retrying cannot help."""
    from pipeline.registry.champion_vocab import pin_to_champion
    from pipeline.registry.tracking import client
    from pipeline.errors import RegistryError

    gone = prepare_dataset(config(corpus(tmp_path, NIGHT_1)), store)
    shutil.rmtree(gone.uri)
    c = client(store)
    run = c.create_run(c.create_experiment("rnnlm-x"), tags={"data.uri": gone.uri})
    c.create_registered_model("rnnlm-x")
    mv = c.create_model_version("rnnlm-x", str(tmp_path / "model"), run_id=run.info.run_id)
    c.set_registered_model_alias("rnnlm-x", "champion", mv.version)

    with pytest.raises(RegistryError) as info:
        pin_to_champion(run_config(corpus(tmp_path, NIGHT_2, "grown.txt")), "rnnlm-x", store)
    message = str(info.value)
    assert not info.value.retryable
    assert f"rnnlm-x version {mv.version} (champion)" in message and gone.uri in message, message
    assert "--pin-vocab" in message and "manifest.json is missing" in message, message
    assert not (Path(store) / "datasets" / Path(gone.uri).name).exists()  # nothing recreated
