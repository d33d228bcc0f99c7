"""How many CPU threads a trainer rank uses, and how many of this process's CPUs are busy.

Torch-free, so the launcher can ask before it starts the trainer (``pipeline.training.launch``) and
the trainer applies the same rule once it runs (``pipeline.training.distributed``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import psutil

THREADS_ENV = "RNNLM_NUM_THREADS"


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask: a container's share, not the host's)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def threads_per_rank(local_world_size: int, env: Mapping[str, str] = os.environ) -> int:
    """``RNNLM_NUM_THREADS`` if set, else the usable CPUs shared out over the node's ranks:
    oversubscribing the cores makes every rank slow (OpenMP threads spin)."""
    threads = env.get(THREADS_ENV)
    return int(threads) if threads else max(1, len(usable_cpus()) // local_world_size)


def busy_cpus(interval_s: float) -> float:
    """How many of the usable CPUs the host's processes keep busy now (sampled for ``interval_s``)."""
    per_cpu = psutil.cpu_percent(interval=interval_s, percpu=True)
    return sum(per_cpu[i] for i in usable_cpus() if i < len(per_cpu)) / 100
