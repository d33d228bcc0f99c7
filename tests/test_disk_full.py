"""A full disk: the storage root on a small tmpfs (mounted here; needs root, as CI runs).

Each failure is one line naming the root (or PREFECT_HOME) and "no space left", exit 3, and
leaves nothing a later run would take as complete; once space is freed, the same command works.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pipeline import storage
from pipeline.errors import StorageError
from pipeline.training.checkpoint import list_checkpoints, save_checkpoint
from tests.test_cli import SMALL, rnnlm

FILLER = "filler.bin"


@contextlib.contextmanager
def mounted_tmpfs(disk: Path, size: str):
    """A tmpfs of ``size`` at ``disk`` (skipping the test where mounting is not allowed), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs at ``tmp_path/disk``."""
    with mounted_tmpfs(tmp_path / "disk", "4m") as disk:
        yield disk


def fill(disk: Path, leave: int = 0) -> None:
    """Take all free space on ``disk`` but about ``leave`` bytes (tmpfs counts whole pages)."""
    free = shutil.disk_usage(disk).free
    with open(disk / FILLER, "ab") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
        except OSError:  # already fuller than asked
            pass


def free_space(disk: Path) -> None:
    (disk / FILLER).unlink()


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The failure's line: the last line of stderr, and no traceback before it."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("rnnlm: error: "), proc.stderr[-3000:]
    return line


def test_fetch_on_a_full_disk_blames_the_root_not_the_source(small_disk, tmp_path):
    root = small_disk / "root"
    root.mkdir()
    fill(small_disk)
    proc = rnnlm("prepare", "--root", str(root), cwd=tmp_path, check=False)
    line = one_error_line(proc)
    assert proc.returncode == 3
    assert str(root) in line and "no space left" in line and "unreachable" not in line
    assert not (root / "corpus").exists() or not any((root / "corpus").iterdir())  # no partial copy

    free_space(small_disk)
    rnnlm("prepare", "--root", str(root), cwd=tmp_path)


def test_shards_that_do_not_fit_leave_no_dataset_and_are_written_once_space_is_freed(small_disk, tmp_path):
    root = small_disk / "root"
    rnnlm("prepare", "--root", str(root), "--set", "data.splits.max_tokens=1000", cwd=tmp_path)  # the corpus copy
    fill(small_disk, leave=16 * 1024)
    proc = rnnlm("prepare", "--root", str(root), cwd=tmp_path, check=False)
    line = one_error_line(proc)
    assert proc.returncode == 3 and str(root) in line and "no space left" in line
    datasets = sorted(p.name for p in (root / "datasets").iterdir())
    assert len(datasets) == 1, datasets  # the small one; no staging dir, no second dataset

    free_space(small_disk)
    rnnlm("prepare", "--root", str(root), cwd=tmp_path)
    assert len([p for p in (root / "datasets").iterdir() if (p / "manifest.json").is_file()]) == 2


def test_a_checkpoint_that_does_not_fit_keeps_the_last_good_one(small_disk):
    directory = str(small_disk / "checkpoints")
    weights = {"w": torch.zeros(256 * 1024 // 4)}  # 256 KB
    first = save_checkpoint(directory, {"epoch": 1, "step": 10, "model": weights}, keep=1)
    fill(small_disk, leave=128 * 1024)
    with pytest.raises(StorageError, match="no space left") as e:
        save_checkpoint(directory, {"epoch": 2, "step": 20, "model": weights}, keep=1)
    assert directory in str(e.value) and "last good one is kept" in str(e.value)
    assert list_checkpoints(directory) == [first]
    assert sorted(os.listdir(directory)) == [os.path.basename(first)]  # no temporary file left
    assert torch.load(first, weights_only=True)["epoch"] == 1

    free_space(small_disk)
    second = save_checkpoint(directory, {"epoch": 2, "step": 20, "model": weights}, keep=1)
    assert list_checkpoints(directory) == [second]


@pytest.mark.slow
def test_training_on_a_full_disk_stops_at_the_checkpoint_and_resumes_once_space_is_freed(small_disk, tmp_path):
    root = small_disk / "root"
    train = ["train", "--root", str(root), *SMALL]
    first = rnnlm(*train, cwd=tmp_path)  # epoch 1 with room to spare
    run_dir = Path(first.stdout.split("training in ", 1)[1].split(" ", 1)[0])
    ckpt_dir = run_dir / "checkpoints"
    [epoch_1] = sorted(ckpt_dir.iterdir())
    fill(small_disk, leave=epoch_1.stat().st_size // 2)

    full = rnnlm(*train, "--set", "train.epochs=2", cwd=tmp_path, check=False)
    line = one_error_line(full)
    assert full.returncode == 3 and str(root) in line and "no space left" in line
    assert sorted(ckpt_dir.iterdir()) == [epoch_1]  # the last good checkpoint, and nothing half-written
    assert torch.load(epoch_1, weights_only=True)["epoch"] == 1

    free_space(small_disk)
    resumed = rnnlm(*train, "--set", "train.epochs=2", cwd=tmp_path)
    assert "resum" in resumed.stdout + resumed.stderr
    assert storage.read_json(str(run_dir / "result.json"))["epochs"] == 2


@pytest.mark.slow
def test_run_on_a_full_disk_says_so_at_once(small_disk, tmp_path):
    root = small_disk / "root"
    root.mkdir()
    fill(small_disk, leave=64 * 1024)
    started = time.monotonic()
    proc = rnnlm("run", "--root", str(root), *SMALL, cwd=tmp_path, check=False)
    line = one_error_line(proc)
    assert proc.returncode == 3 and "no space left" in line and str(root) in line
    assert time.monotonic() - started < 60  # not Prefect's two-minute start-up timeout


@pytest.mark.slow
def test_a_full_mlflow_store_moves_no_alias(tmp_path, monkeypatch):
    from pipeline.data.prepare import prepare_dataset
    from pipeline.errors import RegistryUnavailableError
    from pipeline.registry import gate, tracking
    from tests.test_gate import BAD, FULL, GOOD, Runs

    with mounted_tmpfs(tmp_path / "disk", "32m") as disk:
        root = str(disk / "root")  # the SQLite store and its artifacts live here
        monkeypatch.setenv(storage.ENV_STORAGE, root)
        runs = Runs.__new__(Runs)
        runs.full = prepare_dataset(FULL, str(tmp_path / "data"))
        runs.data, runs.dirs = {"good": FULL, "bad": FULL}, {}
        for name, cfg in (("good", GOOD), ("bad", BAD)):
            runs.dirs[name] = Runs._train(tmp_path, name, runs.full, cfg)
        bad = runs.register("bad", "rnnlm-full")
        assert gate.promote_if_better("rnnlm-full", bad.version, runs.full).promoted
        good = runs.register("good", "rnnlm-full")  # better: the gate would promote it

        fill(disk)
        with pytest.raises(RegistryUnavailableError) as e:
            gate.promote_if_better("rnnlm-full", good.version, runs.full)
        assert "no space left" in str(e.value) and root in str(e.value) and not e.value.retryable
        free_space(disk)
        assert str(tracking.client().get_registered_model("rnnlm-full").aliases["champion"]) == str(bad.version)
        assert "gate.decision" not in tracking.client().get_model_version("rnnlm-full", good.version).tags
        assert gate.promote_if_better("rnnlm-full", good.version, runs.full).promoted  # once space is freed


def test_a_full_disk_is_not_retried():
    import errno

    from tasks.retries import is_retryable

    assert not is_retryable(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_retryable(RuntimeError("sqlite3.OperationalError: database or disk is full"))
    assert is_retryable(OSError(errno.ECONNRESET, "Connection reset by peer"))
