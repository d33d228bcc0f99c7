"""Shared flow plumbing: task runners, config resolution, state bookkeeping, reports."""

from __future__ import annotations

import os
from typing import Any, Optional

from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.config import DEFAULT_PRESET, RunConfig, load_run_config, preset_names
from tasks.common import ENV_DASK, PipelineOptions


def task_runner_for(options: PipelineOptions | None = None):
    """A thread pool, or Dask (prefect-dask) when ``options.dask`` / ``$RNNLM_DASK`` asks for it.

    ``local``: a temporary ``LocalCluster`` of worker processes on this machine;
    ``local-threads``: the same with ``processes=False`` (one process, cheap to start);
    anything else is a scheduler address (``tcp://host:8786``).
    """
    options = options or PipelineOptions()
    target = options.dask_target()
    if not target:
        return ThreadPoolTaskRunner(max_workers=options.max_workers)
    from prefect_dask import DaskTaskRunner

    if target == "local":
        n = max(1, min(4, os.cpu_count() or 1))
        return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    if target == "local-threads":
        return DaskTaskRunner(cluster_kwargs={"n_workers": 1, "threads_per_worker": options.max_workers or 2,
                                              "processes": False, "dashboard_address": None})
    return DaskTaskRunner(address=target)


def default_task_runner():
    """The decorator default: a thread pool unless ``$RNNLM_DASK`` is set when flows are imported."""
    return task_runner_for(PipelineOptions(dask=os.environ.get(ENV_DASK) or None))


def resolve_config(config: Optional[RunConfig] = None, preset: Optional[str] = None,
                   overrides: Optional[list[str]] = None) -> RunConfig:
    """A RunConfig given directly, or a preset name / YAML path plus ``section.key=value`` overrides."""
    if config is not None:
        if overrides:
            from pipeline.config import apply_overrides, parse_config

            return parse_config(RunConfig, apply_overrides(config.model_dump(mode="json"), overrides), source="overrides")
        return config
    return load_run_config(preset or DEFAULT_PRESET, overrides or [])


def state_names(*futures_or_states) -> list[str]:
    """The state names (``Completed``, ``Cached``...) of futures or states."""
    names = []
    for f in futures_or_states:
        state = getattr(f, "state", f)
        names.append(state.name)
    return names


def flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.get_id()


def flow_run_url() -> str | None:
    """The flow run's page in the Prefect UI (None when the UI address is unknown)."""
    from prefect.runtime import flow_run

    return flow_run.get_flow_run_ui_url()


def registry_preset(config: Optional[RunConfig], preset: Optional[str]) -> str:
    """The name models are registered under (``rnnlm-<this>``): the preset, a YAML file's stem, or ``custom``."""
    if config is not None:
        return "custom"
    name = str(preset or DEFAULT_PRESET)
    return name if name in preset_names() else os.path.splitext(os.path.basename(name))[0] or "custom"


def epochs_table(epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("epoch", "step", "train_ppl", "val_ppl", "tokens_per_s", "grad_norm", "lr", "elapsed_s")
    return [{k: (round(e[k], 4) if isinstance(e.get(k), float) else e.get(k)) for k in keys} for e in epochs]


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown_report(dataset: dict[str, Any], run: dict[str, Any], evaluation: dict[str, Any],
                    epochs: list[dict[str, Any]]) -> str:
    lines = [
        "# rnnlm training report", "",
        "| metric | value |", "|---|---|",
        f"| dataset | `{dataset['dataset_id']}` ({dataset['level']} level) |",
        f"| tokens (train / val / test) | {dataset['num_tokens']:,} ({dataset['splits']['train']:,} / {dataset['splits']['val']:,} / {dataset['splits']['test']:,}) |",
        f"| vocabulary | {dataset['vocab_size']:,} |",
        f"| epochs | {run.get('epochs')} ({'finished' if run.get('finished') else 'stopped early (max_minutes)'}) |",
        f"| training throughput | {_fmt(run.get('tokens_per_s'), ',.0f')} tokens/s on {run.get('device')} x {run.get('world_size')} |",
        f"| training time | {_fmt(run.get('wall_s'), '.1f')} s |",
        f"| train perplexity (last epoch) | {_fmt(run.get('train_ppl'))} |",
        f"| validation perplexity | {_fmt(evaluation.get('val_ppl'))} |",
        f"| test perplexity | {_fmt(evaluation.get('test_ppl'))} |",
        f"| model | `{run['model_uri']}` |", "",
        "## Samples", "",
    ]
    for s in evaluation.get("samples", []):
        lines += [f"**{s['prefix']}**", "", "```", s["text"], "```", ""]
    if epochs:
        lines += ["## Per-epoch metrics", "", "| epoch | train ppl | val ppl | tokens/s | lr |", "|---|---|---|---|---|"]
        for e in epochs[-20:]:
            lines.append(f"| {e['epoch']} | {_fmt(e.get('train_ppl'))} | {_fmt(e.get('val_ppl'))} | {_fmt(e.get('tokens_per_s'), ',.0f')} | {_fmt(e.get('lr'), '.3g')} |")
        if len(epochs) > 20:
            lines.append(f"\n(last 20 of {len(epochs)} epochs; all in the `rnnlm-epochs` table artifact)")
    return "\n".join(lines)
