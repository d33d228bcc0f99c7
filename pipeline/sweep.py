"""Sweeps: several configurations of one run, the best by validation perplexity kept.

A sweep file names the trials by the same ``section.key`` names ``--set`` takes::

    grid: {train.lr: [0.004, 0.001], model.dropout_output: [0.1, 0.2]}     # every combination
    random: {samples: 8, seed: 0, space: {train.lr: [0.004, 0.002, 0.001]}}  # a seeded sample of them
    trials_per_device: 2                                                   # trials trained at once
    halving: {first_rung_steps: 50, eta: 2}                                # successive halving

:func:`expand` turns it into trials on top of a base RunConfig, each validated up front (a bad
value fails before anything trains, naming the trial and the key), with ids and order that
depend on the file alone. :func:`rung_budgets` and :func:`survivors` are successive halving's
decisions, pure functions of the budgets and the figures so far.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator, model_validator

from pipeline.config import RunConfig, Strict, parse_config
from pipeline.config_sources import apply_overrides, read_raw
from pipeline.errors import ConfigError

SECTIONS = tuple(RunConfig.model_fields)


class RandomSearch(Strict):
    """``samples`` distinct combinations of ``space``, drawn with ``seed`` (all of them if fewer)."""

    samples: int = Field(ge=1)
    seed: int = 0
    space: dict[str, list[Any]]


class Halving(Strict):
    """Successive halving in optimizer steps: every trial trains ``first_rung_steps``, then the best
    ``1/eta`` of those still running go on to ``eta`` times the steps, and so on up to the full budget
    (``train.max_steps``, else ``train.epochs``)."""

    first_rung_steps: int = Field(ge=1)
    eta: int = Field(default=2, ge=2)


class SweepConfig(Strict):
    """A sweep: ``grid`` or ``random`` over ``section.key`` names, how many trials train at once, halving."""

    grid: dict[str, list[Any]] | None = None
    random: RandomSearch | None = None
    trials_per_device: int = Field(default=1, ge=1, description="trials trained at once on one host "
                                   "(one GPU shared, or the CPU cores split between them)")
    halving: Halving | None = None

    @field_validator("grid")
    @classmethod
    def _grid_keys(cls, grid: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        return _check_space(grid, "grid") if grid is not None else None

    @model_validator(mode="after")
    def _one_search(self) -> "SweepConfig":
        if (self.grid is None) == (self.random is None):
            raise ValueError("give exactly one of grid or random")
        if self.random is not None:
            _check_space(self.random.space, "random.space")
        return self


def _check_space(space: dict[str, list[Any]], where: str) -> dict[str, list[Any]]:
    if not space:
        raise ValueError(f"{where} names no key")
    for key, values in space.items():
        section, _, rest = key.partition(".")
        if section not in SECTIONS or not rest:
            raise ValueError(f"{where}: {key!r} is not a section.key name (sections: {', '.join(SECTIONS)})")
        if not values:
            raise ValueError(f"{where}: {key} has no values")
    return space


@dataclass(frozen=True)
class Trial:
    """One configuration of a sweep: ``id`` (``t<index>-<hash of the values>``), the values it sets, its config."""

    index: int
    id: str
    overrides: dict[str, Any]
    config: RunConfig

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.overrides.items())


def load_sweep(path: str) -> SweepConfig:
    """Read and validate a sweep file (YAML), a ConfigError naming the file and every bad key otherwise."""
    return parse_config(SweepConfig, read_raw(path), source=str(path))


def combinations(sweep: SweepConfig) -> list[dict[str, Any]]:
    """The values each trial sets, in trial order: a grid in the file's key order, a random sample in draw order."""
    space = sweep.grid if sweep.grid is not None else sweep.random.space
    keys = list(space)
    grid = [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]
    if sweep.random is None:
        return grid
    picks = random.Random(sweep.random.seed).sample(range(len(grid)), min(sweep.random.samples, len(grid)))
    return [grid[i] for i in picks]


def trial_id(index: int, overrides: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"t{index:02d}-{digest}"


def expand(sweep: SweepConfig, base: RunConfig) -> list[Trial]:
    """Every trial of ``sweep`` on top of ``base``, each config validated before anything runs."""
    raw = base.model_dump(mode="json")
    trials = []
    for i, overrides in enumerate(combinations(sweep)):
        tid = trial_id(i, overrides)
        try:
            cfg = parse_config(RunConfig, apply_overrides(raw, overrides), source=f"sweep trial {tid}")
        except ConfigError as e:
            raise ConfigError(f"{e} (trial {tid} sets {', '.join(f'{k}={v!r}' for k, v in overrides.items())})") from None
        trials.append(Trial(i, tid, overrides, cfg))
    return trials


# ----------------------------------------------------------------------- successive halving


def full_budget_steps(cfg: RunConfig) -> int | None:
    """A trial's whole budget in steps: ``train.max_steps`` (None: its epochs are the budget)."""
    return cfg.train.max_steps


def rung_budgets(halving: Halving, full_steps: int | None, trials: int) -> list[int | None]:
    """The step budget of each rung; the last is the full budget (None: train to ``epochs``).

    Rungs grow by ``eta`` until one trial is left or the next rung reaches the full budget.
    """
    budgets: list[int | None] = []
    steps, alive = halving.first_rung_steps, trials
    while alive > 1 and (full_steps is None or steps < full_steps):
        budgets.append(steps)
        steps *= halving.eta
        alive = math.ceil(alive / halving.eta)
    return budgets + [full_steps]


def survivors(scores: dict[str, float | None], eta: int) -> list[str]:
    """The ids that go on to the next rung: the best ``ceil(n / eta)`` by validation perplexity.

    ``scores`` are in trial order; a missing or non-finite figure (a failed trial) never survives;
    ties go to the earlier trial, so the decision depends on the figures alone.
    """
    keep = math.ceil(len(scores) / eta)
    ranked = sorted((ppl, i, tid) for i, (tid, ppl) in enumerate(scores.items())
                    if ppl is not None and math.isfinite(ppl))
    return [tid for _, _, tid in sorted(ranked[:keep], key=lambda r: r[1])]


def best_trial(scores: dict[str, float | None]) -> str | None:
    """The id with the lowest validation perplexity (the earlier trial on a tie), None if none finished."""
    top = survivors(scores, eta=max(len(scores), 1))
    return top[0] if top else None
