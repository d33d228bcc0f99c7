"""Issue 12, the data side: what heals heals, nothing unverified is kept, clear errors, bounded memory.

* line endings: one rule (``\\n``, ``\\r\\n``, lone ``\\r``) whatever the normalizer;
* over-long lines are cut at safe places: the same tokens as unchunked, memory bounded by ``chunk_bytes``;
* a corpus copy that fails its declared checksum is not kept;
* a corrupt prepared dataset (or corpus copy) is quarantined and rebuilt, with a warning naming the file;
* a read-only root: an error naming the root and what could not be written; an already
  prepared dataset still trains from it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from pipeline.data.corpus import fetch_corpus, fetch_source
from pipeline.errors import CorpusError
from pipeline.data.prepare import plan_chunks, prepare_dataset
from pipeline.data.shards import open_dataset
from pipeline.data.tokenizer import char_codes, tokenize, word_tokens

REPO = Path(__file__).resolve().parents[1]

TOKENIZERS = {
    "char-d2l": TokenizerConfig(level="char"),
    "char-d2l-space": TokenizerConfig(level="char", newlines="space"),
    "char-none": TokenizerConfig(level="char", normalizer="none"),
    "char-lower": TokenizerConfig(level="char", normalizer="lower"),
    "word-d2l-eos": TokenizerConfig(level="word", eos=True),
    "word-none-eos": TokenizerConfig(level="word", normalizer="none", eos=True),
    "word-none-eos-empty": TokenizerConfig(level="word", normalizer="none", eos=True, eos_on_empty_lines=True),
    "word-lower": TokenizerConfig(level="word", normalizer="lower"),
}


# ----------------------------------------------------------------------- line endings


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_lone_cr_is_a_line_break_with_every_normalizer(name):
    cfg = TOKENIZERS[name].model_copy(update={"newlines": "keep"}) if name.startswith("char") else TOKENIZERS[name]
    assert tokenize("Ab cd\rEf\r\ngh\r\rij\n", cfg) == tokenize("Ab cd\nEf\ngh\n\nij\n", cfg)
    assert "\r" not in "".join(tokenize("a\rb", cfg))


# ------------------------------------------------------------------- over-long lines


def long_line_text(n: int = 40_000) -> str:
    """One long line of words, punctuation runs, non-ASCII and lone CRs, between short lines."""
    rng = np.random.default_rng(0)
    pieces = ["Time", "traveller", "--", "  ", "...", "caf\u00e9", "\u4e2d\u6587", "42", "\U0001f600", "x", "\t", "\r",
              "  ,;  ", "The", "machine", "<b>", " "]
    words = rng.choice(len(pieces), size=n)
    line = " ".join(pieces[i] for i in words)
    return "A short line\n\n" + line + "\n  \nand after\n" + line.replace("\r", "") + " end"


def chunk_tokens(path: Path, cfg: TokenizerConfig, chunk_bytes: int, root: Path) -> tuple[list, list]:
    docs = fetch_corpus((SourceConfig(url=str(path)),), str(root))
    chunks = plan_chunks(docs, chunk_bytes, cfg)
    tokens: list = []
    for c in chunks:
        data = c.read()
        if cfg.level == "char":
            tokens += [chr(x) for x in char_codes(data, cfg).tolist()]
        else:
            tokens += word_tokens(data, cfg, c.continues).to_pylist()
    return chunks, tokens


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_overlong_lines_are_cut_safely(tmp_path, name):
    cfg = TOKENIZERS[name]
    text = long_line_text()
    path = tmp_path / "long.txt"
    path.write_bytes(text.encode())
    chunks, tokens = chunk_tokens(path, cfg, 1024, tmp_path / "store")
    sizes = [c.end - c.start for c in chunks]
    assert len(text.encode()) > 100 * 1024 and max(sizes) <= 2 * 1024, max(sizes)
    assert sum(c.continues for c in chunks) > 100
    assert tokens == tokenize(text, cfg)


def test_overlong_line_dataset_equals_unchunked(tmp_path):
    path = tmp_path / "long.txt"
    path.write_bytes(long_line_text(20_000).encode())
    cfg = DataConfig(sources=(SourceConfig(url=str(path)),), tokenizer=TOKENIZERS["word-none-eos"], chunk_bytes=1024)
    small = prepare_dataset(cfg, str(tmp_path / "a"))
    whole = prepare_dataset(cfg.model_copy(update={"chunk_bytes": 2**26}), str(tmp_path / "b"))
    assert small.vocab == whole.vocab
    for split in ("train", "val", "test"):
        assert np.array_equal(small.split(split), whole.split(split))


MEMORY_PROBE = """
import json, sys, tracemalloc
import pyarrow as pa
import pipeline.data.corpus
from pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from pipeline.data.prepare import prepare_dataset

path, root, level = sys.argv[1:4]
pipeline.data.corpus.READ_BLOCK = 16 * 1024  # the fetch streams in small blocks too: measure the chunk steps
cfg = DataConfig(sources=(SourceConfig(url=path),), tokenizer=TokenizerConfig(level=level),
                 chunk_bytes=16 * 1024, tokens_per_shard=20_000)
with open(path + ".small", "w") as f:
    f.write("the time machine " * 50)
# Imports (some are lazy) are not the chunk steps' memory. Arrow's pool peak cannot be reset: a tiny warm-up.
prepare_dataset(cfg.model_copy(update={"sources": (SourceConfig(url=path + ".small"),)}), root)
tracemalloc.start()
ds = prepare_dataset(cfg, root)
print(json.dumps({"python": tracemalloc.get_traced_memory()[1], "arrow": pa.default_memory_pool().max_memory(),
                  "tokens": ds.num_tokens}))
"""


@pytest.mark.parametrize("level", ["char", "word"])
def test_memory_of_one_long_line_is_bounded_by_chunk_bytes(tmp_path, level):
    """An 8 MB file with no line break, 16 KB chunks: the chunk steps' peak (Python objects
    and numpy under tracemalloc, plus pyarrow's pool) stays far below the file size."""
    words = ["time", "traveller", "machine", "the", "of", "psychologist", "--", "42"]
    rng = np.random.default_rng(1)
    text = " ".join(words[i] for i in rng.integers(0, len(words), size=1_400_000))
    path = tmp_path / "one-line.txt"
    path.write_bytes(text.encode())
    size = path.stat().st_size
    assert size > 8 * 2**20 and b"\n" not in path.read_bytes()
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(tmp_path / "store"), level],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    assert peak["tokens"] > 500_000
    assert peak["python"] + peak["arrow"] < size / 4, peak


# ------------------------------------------------------------- nothing unverified is kept


@pytest.mark.parametrize("algo", ["sha1", "sha256"])
def test_checksum_mismatch_keeps_no_copy(tmp_path, store, algo):
    path = tmp_path / "text.txt"
    path.write_bytes(b"some text that is not what was declared\n")
    with pytest.raises(CorpusError, match=f"checksum mismatch: expected {algo}"):
        fetch_source(SourceConfig(url=str(path), **{algo: "0" * (40 if algo == "sha1" else 64)}), store)
    corpus = Path(store) / "corpus"
    assert not corpus.exists() or list(corpus.iterdir()) == []


# ---------------------------------------------------------------- corrupt artifacts heal


def quarantined(store: str) -> list[Path]:
    q = Path(store) / "quarantine"
    return sorted(p for p in q.rglob("*") if p.is_file()) if q.exists() else []


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {  # how a prepared dataset gets broken -> the file its warning must name
    "flipped-shard": lambda d, m: (flip_byte(d / m["splits"]["train"]["shards"][1]["file"]),
                                   m["splits"]["train"]["shards"][1]["file"])[1],
    "deleted-shard": lambda d, m: ((d / m["splits"]["val"]["shards"][0]["file"]).unlink(),
                                   m["splits"]["val"]["shards"][0]["file"])[1],
    "truncated-vocab": lambda d, m: ((d / "vocab.parquet").write_bytes((d / "vocab.parquet").read_bytes()[:-9]),
                                     "vocab.parquet")[1],
    "garbled-manifest": lambda d, m: ((d / "manifest.json").write_text('{"schema_version": 1, "spl'), "manifest.json")[1],
    "no-manifest": lambda d, m: ((d / "manifest.json").unlink(), "manifest.json")[1],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_prepare_quarantines_and_rebuilds_a_corrupt_dataset(store, caplog, damage):
    cfg = DataConfig(tokens_per_shard=20_000)
    first = prepare_dataset(cfg, store)
    expected = {s: first.split(s).copy() for s in ("train", "val", "test")}
    name = DAMAGE[damage](Path(first.uri), first.manifest)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        again = prepare_dataset(cfg, store)
    assert again.uri == first.uri
    for split, ids in expected.items():
        assert np.array_equal(open_dataset(again.uri).split(split), ids)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert first.uri in warning and name in warning and "quarantine" in warning
    kept = quarantined(store)
    assert kept and all(p.relative_to(Path(store) / "quarantine").parts[0] == "datasets" for p in kept)
    if damage not in ("deleted-shard", "no-manifest"):
        assert name in [p.name for p in kept]  # the bad file is kept for a post-mortem, not deleted


def test_a_corrupt_corpus_copy_is_quarantined_and_replaced(tmp_path, store, caplog):
    path = tmp_path / "text.txt"
    path.write_bytes(b"The Time Traveller was expounding a recondite matter to us.\n" * 50)
    [doc] = fetch_source(SourceConfig(url=str(path)), store)
    flip_byte(Path(doc.uri))
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        [again] = fetch_source(SourceConfig(url=str(path)), store)
    assert Path(again.uri).read_bytes() == path.read_bytes()
    assert any(doc.uri in r.getMessage() and "quarantine" in r.getMessage() for r in caplog.records)
    [kept] = quarantined(store)
    assert kept.name.startswith(Path(doc.uri).name) and kept.read_bytes() != path.read_bytes()


def test_rnnlm_prepare_and_train_heal_a_corrupt_shard(tmp_path):
    root = tmp_path / "store"
    small = ["--set", "data.splits.max_tokens=20000", "--set", "data.tokens_per_shard=5000", "--set", "model.hidden_size=16",
             "--set", "model.embed_size=8", "--set", "train.epochs=1", "--set", "train.max_minutes=null"]
    first = json.loads(_rnnlm("prepare", "--root", str(root), *small).stdout)
    shard = root / "datasets" / first["dataset_id"] / "train-00001.parquet"
    flip_byte(shard)
    healed = _rnnlm("prepare", "--root", str(root), *small)
    assert f"{shard}" in healed.stderr and "quarantine" in healed.stderr
    assert json.loads(healed.stdout)["dataset_id"] == first["dataset_id"]
    flip_byte(shard)
    trained = _rnnlm("train", "--root", str(root), *small)
    assert f"{shard}" in trained.stderr and "quarantine" in trained.stderr
    assert json.loads(trained.stdout[trained.stdout.rindex('{\n  "run_dir"'):])["finished"] is True
    assert len(list((root / "quarantine" / "datasets").iterdir())) == 2


def _rnnlm(*args: str, user: int | None = None, check: bool = True, **env) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("rnnlm")), *args]
    environ = {k: v for k, v in os.environ.items() if k not in ("RNNLM_STORAGE", "PYTHONPATH")}
    if user is not None:  # this venv's interpreter may sit in a directory only its owner can enter
        python, path = interpreter_for_others()
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", python, "-m", "flows.cli", *args]
        environ["PYTHONPATH"] = path
    environ.update(RNNLM_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=environ, cwd=env.get("HOME"))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# ------------------------------------------------------------------------ read-only roots

NOBODY = 65534
AS_ROOT = os.geteuid() == 0
SMALL = ["--set", "data.splits.max_tokens=20000", "--set", "model.hidden_size=16", "--set", "model.embed_size=8",
         "--set", "train.epochs=1", "--set", "train.max_minutes=null"]


@pytest.fixture
def shared_dir():
    """A directory another user can reach: pytest's own tmp dirs are private to the user running it.

    Root ignores file permissions, so as root the commands under test run as ``nobody``
    (``setpriv``), and "read-only" means owned by root; as any other user it means chmod.
    """
    d = Path(tempfile.mkdtemp(prefix="rnnlm-readonly-", dir="/tmp"))
    d.chmod(0o755)
    home = d / "home"
    home.mkdir()
    if AS_ROOT:
        os.chown(home, NOBODY, NOBODY)
    try:
        yield d
    finally:
        for p in [d, *d.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(d)


def read_only(*paths: Path) -> None:
    """Take write permission away (as root, ownership already does: the tested process is nobody)."""
    if AS_ROOT:
        return
    for top in paths:
        for p in [top, *top.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)


def interpreter_for_others() -> tuple[str, str]:
    """A Python of this version that any user can run, and the PYTHONPATH giving it this venv's packages."""
    import sysconfig

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "test", "-x",
                                os.path.realpath(python)], capture_output=True)
        if probe.returncode == 0:
            return python, os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]])
    pytest.skip(f"no {version} interpreter that user {NOBODY} may run, so a read-only root cannot be tested as root")


def as_user(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    return _rnnlm(*args, user=NOBODY if AS_ROOT else None, check=check, HOME=str(home),
                  RNNLM_SPLIT_CACHE=str(home / ".cache" / "rnnlm" / "splits"))  # the user's own, not the test's


def test_read_only_root_error_names_the_root_and_what(shared_dir):
    root = shared_dir / "store"
    root.mkdir(mode=0o755)
    read_only(root)
    proc = as_user("prepare", "--root", str(root), home=shared_dir / "home", check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"artifact store '{root}': not writable" in last and f"{root}/corpus" in last, last
    assert "Traceback" not in proc.stderr


def test_prepared_dataset_trains_from_a_read_only_data_part(shared_dir):
    root = shared_dir / "store"
    summary = json.loads(_rnnlm("prepare", "--root", str(root), *SMALL).stdout)
    runs = root / "runs"
    runs.mkdir()
    if AS_ROOT:
        os.chown(runs, NOBODY, NOBODY)
    data_part = [root / "corpus", root / "datasets"]
    before = sorted(str(p) for d in data_part for p in d.rglob("*"))
    read_only(*data_part)
    proc = as_user("train", "--root", str(root), *SMALL, home=shared_dir / "home")
    assert json.loads(proc.stdout[proc.stdout.rindex('{\n  "run_dir"'):])["finished"] is True
    assert summary["uri"] in proc.stdout
    assert sorted(str(p) for d in data_part for p in d.rglob("*")) == before


def test_a_read_only_root_fails_train_and_run_in_one_line(shared_dir):
    """The whole root read-only (not just its data part): `train` cannot create runs/, `run` cannot
    create prefect/ (its temporary server's home, the first thing it writes); each says so in one
    line naming the root, exit 3 (not retried), nothing written."""
    root = shared_dir / "store"
    _rnnlm("prepare", "--root", str(root), *SMALL)
    read_only(root)
    before = sorted(str(p) for p in root.rglob("*"))
    for command, what in (("train", root / "runs"), ("run", root / "prefect")):
        proc = as_user(command, "--root", str(root), *SMALL, home=shared_dir / "home", check=False)
        assert proc.returncode == 3, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"rnnlm: error: artifact store '{root}': not writable: could not write {what}"), last
    assert sorted(str(p) for p in root.rglob("*")) == before
