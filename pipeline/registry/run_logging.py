"""Logging one finished training as an MLflow run: params, per-epoch metrics, the final
held-out figures, artifacts and lineage tags.

    run_id = log_training_run(run_dir, dataset, preset="timemachine-char", config=run_cfg,
                              flow_run_id=..., flow_run_url=...)

Where the runs live (tracking URI, client, experiments) is ``pipeline.registry.tracking``.
Logging refuses failed trainings (``pipeline.registry.run_checks``): nothing is logged for them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import ConfigError, RegistryError
from pipeline.training.metrics import read_epochs, with_bits
from pipeline.registry.run_checks import check_training_succeeded, load_run_lm
from pipeline.registry.run_record import code_version, flatten, generate_samples, run_files
from pipeline.registry.tracking import client, experiment_name, get_or_create_experiment, registry_access

log = logging.getLogger(__name__)

EPOCH_METRICS = ("train_ppl", "val_ppl", "train_bits", "val_bits", "tokens_per_s", "grad_norm", "lr")


@registry_access("logging a training run in MLflow")
def log_training_run(run_dir: str, dataset, *, preset: str, config: RunConfig,
                     flow_run_id: str | None = None, flow_run_url: str | None = None,
                     samples: list[str] | None = None, sample_prefixes: list[str] | None = None,
                     run_key: str | None = None, root: str | None = None,
                     held_out: dict[str, float | None] | None = None, parent_run_id: str | None = None) -> str:
    """Log one finished training as an MLflow run in experiment ``rnnlm-<preset>``; return its id.

    Params: ``config`` flattened (``model.hidden_size``, ``train.lr``, ``data.sources.0.url``...).
    Metrics: every epoch of metrics.jsonl (step = epoch), ``final_val_ppl`` and
    ``final_test_ppl`` (fixed evaluation settings, the figures the gate compares), each
    perplexity with its bits per token (``*_bits``) beside it. ``held_out`` passes figures
    already computed by the one evaluation (``{"val_ppl": .., "test_ppl": ..}``, the
    evaluate task's), so they are logged as they are, not computed a second time.
    Artifacts: ``perplexity.png``, ``samples.txt``, ``vocab.json``, ``manifest.json``,
    ``lm.json``, ``result.json``, ``metrics.jsonl``. Tags: lineage (Prefect flow run, dataset,
    sources, code version). ``samples`` are texts logged as given; otherwise samples are
    generated (greedy and seeded sampling, 100 tokens) from ``sample_prefixes``, by default
    the first 10 tokens of the validation split. ``parent_run_id`` nests the run under that
    run (a sweep's, ``pipeline.registry.sweep_logging``). Raises UnregistrableRunError for a failed run,
    RegistryUnavailableError (retryable) when MLflow fails.

    Idempotent: the run is tagged ``rnnlm.run_key`` (``run_key``, default a hash of
    ``run_dir``), and a FINISHED run with the same key in the experiment is returned
    instead of logging again, so a retried orchestrator task does not duplicate it.
    """
    result = check_training_succeeded(run_dir)
    lm = load_run_lm(run_dir, dataset)
    if lm.dataset_id is not None and lm.dataset_id != dataset.dataset_id:
        raise RegistryError(f"{run_dir}/lm.json says the model was trained on dataset {lm.dataset_id}, "
                            f"not {dataset.dataset_id}")
    c = client(root)
    experiment_id = get_or_create_experiment(c, experiment_name(preset), root)
    run_key = _run_key(run_key, run_dir)
    done = c.search_runs([experiment_id], f"tags.`rnnlm.run_key` = '{run_key}' and attributes.status = 'FINISHED'",
                         max_results=1)
    if done:
        log.info("run %s already logged as MLflow run %s", run_dir, done[0].info.run_id)
        return done[0].info.run_id

    tags = _lineage_tags(run_dir, dataset, lm, preset, run_key, flow_run_id, flow_run_url)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id, run_name=f"{preset}-{flow_run_id or time.strftime('%Y%m%d-%H%M%S')}",
                       tags={k: v for k, v in tags.items() if v != ""})
    run_id = run.info.run_id
    try:
        figures = _log_contents(c, run_id, run_dir, lm, dataset, result, preset, config, samples,
                                sample_prefixes, held_out)
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")
    log.info("logged run %s (experiment %s): val ppl %s, test ppl %s", run_id, experiment_name(preset),
             figures["final_val_ppl"], figures["final_test_ppl"])
    return run_id


def _run_key(run_key: str | None, run_dir: str) -> str:
    """``run_key``, by default a hash of ``run_dir``; checked to be safe inside a search filter."""
    run_key = run_key or hashlib.sha256(str(run_dir).encode("utf-8")).hexdigest()[:32]
    if not all(ch.isalnum() or ch in "-_." for ch in run_key):
        raise ConfigError(f"run_key {run_key!r} may hold only letters, digits, '-', '_' and '.'")
    return run_key


def _log_contents(c, run_id: str, run_dir: str, lm, dataset, result: dict[str, Any], preset: str,
                  config: RunConfig, samples: list[str] | None, sample_prefixes: list[str] | None,
                  held_out: dict[str, float | None] | None) -> dict[str, float | None]:
    """Params, metrics and artifacts of MLflow run ``run_id``; returns the final held-out figures."""
    from mlflow.entities import Param

    params = {"preset": preset, **flatten(config.model_dump(mode="json"))}
    _log_batch(c, run_id, params=[Param(k, str(v)) for k, v in params.items()])
    epochs = read_epochs(run_dir)
    figures = _log_metrics(c, run_id, lm, dataset, result, epochs, held_out)
    if samples is None:
        samples = generate_samples(lm, dataset, sample_prefixes)
    _log_artifacts(c, run_id, run_files(run_dir, lm, dataset.manifest, result, epochs, samples,
                                        f"{preset} ({lm.model.cfg.cell})"))
    return figures


def _lineage_tags(run_dir: str, dataset, lm, preset: str, run_key: str,
                  flow_run_id: str | None, flow_run_url: str | None) -> dict[str, str]:
    version, version_source = code_version()
    tags = {
        "rnnlm.preset": preset,
        "rnnlm.run_dir": str(run_dir),
        "rnnlm.run_key": run_key,
        "data.dataset_id": dataset.dataset_id,
        "data.uri": dataset.uri,
        "data.manifest_sha256": lm.meta["dataset"]["manifest_sha256"],
        "data.vocab_sha256": lm.meta["vocab_sha256"],
        "code.version": version,
        "code.version_source": version_source,
        "prefect.flow_run_id": flow_run_id or "",
        "prefect.flow_run_url": flow_run_url or "",
    }
    if version_source == "git":
        tags["mlflow.source.git.commit"] = version
    for i, src in enumerate(dataset.manifest.get("sources", [])):
        tags[f"data.source.{i}.uri"] = str(src.get("source"))
        tags[f"data.source.{i}.sha256"] = str(src.get("sha256"))
    return tags


def _log_metrics(c, run_id: str, lm, dataset, result: dict[str, Any], epochs: list[dict[str, Any]],
                 held_out: dict[str, float | None] | None = None) -> dict[str, float | None]:
    """Per-epoch metrics, training totals and the final held-out figures; returns the latter."""
    from mlflow.entities import Metric, RunTag

    from pipeline.model.evaluate import EVAL_BATCH_SIZE, EVAL_NUM_STEPS

    now = int(time.time() * 1000)
    # An epoch's line is logged at its epoch; a line between epoch ends (eval_every_steps, a
    # budget's final validation) at its optimizer step.
    metrics = [Metric(k, float(e[k]), now, int(e["step"] if e.get("event") == "eval" else e["epoch"]))
               for e in epochs for k in EPOCH_METRICS if isinstance(e.get(k), (int, float)) and math.isfinite(e[k])]
    figures: dict[str, float | None] = {"final_val_ppl": None, "final_test_ppl": None}
    for split in ("val", "test"):
        if held_out is not None:
            figures[f"final_{split}_ppl"] = held_out.get(f"{split}_ppl")
            continue
        ids = dataset.split(split)
        if len(ids) >= 2:
            figures[f"final_{split}_ppl"] = lm.perplexity(ids)
    for k in ("wall_s", "tokens_per_s", "epochs", "steps"):
        if isinstance(result.get(k), (int, float)):
            metrics.append(Metric(f"train_{k}" if not k.startswith("train") else k, float(result[k]), now, 0))
    metrics += [Metric(k, v, now, len(epochs)) for k, v in with_bits(figures).items() if v is not None]
    _log_batch(c, run_id, metrics=metrics)
    _log_batch(c, run_id, tags=[RunTag("eval.batch_size", str(EVAL_BATCH_SIZE)),
                                RunTag("eval.num_steps", str(EVAL_NUM_STEPS)),
                                RunTag("train.finished", str(bool(result.get("finished"))).lower())])
    return figures


def _log_artifacts(c, run_id: str, files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        c.log_artifacts(run_id, tmp)


def _log_batch(c, run_id: str, *, params=(), metrics=(), tags=()) -> None:
    """MlflowClient.log_batch in chunks under MLflow's limits (100 params, 1000 items per call)."""
    params, metrics, tags = list(params), list(metrics), list(tags)
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[i:i + 1000])
    for i in range(0, len(tags), 100):
        c.log_batch(run_id, tags=tags[i:i + 100])
