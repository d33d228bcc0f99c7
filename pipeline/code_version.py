"""Which project modules compute each stage's output, and a digest of their source.

A stage's cache key and the names of the intermediate files it writes include the digest
of the modules it runs, so an upgrade that changes how an output is computed (a tokenizer
fix, a new model cell) recomputes that output and everything downstream instead of
silently reusing a stale artifact. Each stage's list includes the modules of the stages
upstream of it: its output depends on theirs. Modules that only shape errors, logs or the
progress display (``errors.py``, ``progress.py``, ``training/progress.py``) are left out:
rewording a message recomputes nothing.

The lists live here, in one place, as paths relative to the directory holding the
``pipeline`` package (the repository root in a checkout): adjust them when modules are
added, split or renamed (a listed file that does not exist is an error, and
tests/test_flows.py checks every list). Digests are of the files' bytes, computed once per
process.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # holds pipeline/ (and tasks/, flows/ in a checkout)

_FETCH = ("pipeline/config.py", "pipeline/storage.py", "pipeline/data/corpus.py", "tasks/data.py")
_DATA = _FETCH + ("pipeline/data/tokenizer.py", "pipeline/data/vocab.py", "pipeline/data/shards.py",
                  "pipeline/data/integrity.py", "pipeline/data/prepare.py", "pipeline/code_version.py")
_TRAIN = _DATA + ("pipeline/data/training_data.py", "pipeline/data/split_cache.py", "pipeline/data/sampling.py",
                  "pipeline/model/cells.py", "pipeline/model/models.py", "pipeline/model/regularization.py",
                  "pipeline/model/evaluate.py", "pipeline/model/lm.py",
                  "pipeline/training/optim.py", "pipeline/training/precision.py", "pipeline/training/distributed.py",
                  "pipeline/training/cpu_threads.py", "pipeline/training/divergence.py",
                  "pipeline/training/checkpoint.py", "pipeline/training/cuda_graph.py", "pipeline/training/metrics.py",
                  "pipeline/training/rundir.py",
                  "pipeline/training/averaging.py", "pipeline/training/stopping.py", "pipeline/training/run_state.py",
                  "pipeline/training/train.py", "pipeline/training/launch.py", "pipeline/training/processes.py",
                  "pipeline/training/ray_launch.py", "pipeline/config_sources.py", "tasks/train.py")
_EVALUATE = _TRAIN + ("pipeline/model/generate.py",)

STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "fetch": _FETCH,
    "count": _DATA,
    "vocab": _DATA,
    "encode": _DATA,
    "shards": _DATA,
    "train": _TRAIN,
    "evaluate": _EVALUATE,
}  # registration is not cached (it is idempotent instead), so the registry modules key nothing


def code_digest(stage: str) -> str:
    """A digest of the source of every module ``stage`` runs (see ``STAGE_MODULES``)."""
    if stage not in STAGE_MODULES:
        raise KeyError(f"no module list for stage {stage!r} in pipeline.code_version.STAGE_MODULES")
    return _digest(str(SOURCE_ROOT), tuple(sorted(set(STAGE_MODULES[stage]))))


@functools.lru_cache(maxsize=None)
def _digest(root: str, paths: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for rel in paths:
        path = Path(root) / rel
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: listed in pipeline.code_version.STAGE_MODULES but missing; "
                                    f"update the list") from None
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


def clear_cache() -> None:
    """Forget the digests computed so far (after source files changed in this process)."""
    _digest.cache_clear()
