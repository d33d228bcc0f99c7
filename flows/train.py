"""The ``train`` flow: train -> evaluate, with a markdown report and a per-epoch table artifact.

Both tasks run inline in the flow's main thread (they are one each, not mapped), which
lets ``pipeline.training.launch`` forward a SIGTERM to the trainer with its grace period.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.reports import epochs_table, markdown_report
from flows.run_context import flow_run_id
from pipeline.config import ModelConfig, TrainConfig
from pipeline.training.metrics import read_epochs
from tasks.caching import bind
from tasks.options import PipelineOptions
from tasks.retries import retry_if_retryable
from tasks.train import TerminationGuard, evaluate_model, train_model


@flow(name="train", validate_parameters=True)
def train_flow(dataset: dict[str, Any], model: ModelConfig = ModelConfig(),
               training: TrainConfig = TrainConfig(),
               options: PipelineOptions = PipelineOptions()) -> dict[str, Any]:
    """Train a model on a prepared dataset (a ``prepare-data`` manifest) and evaluate it."""
    trainer = bind(train_model, options, retries=options.train_retries, retry_delay_seconds=options.train_retry_delay_s,
                   retry_condition_fn=retry_if_retryable)
    with TerminationGuard(options.grace_s):
        trained = trainer(dataset, model, training, options.store_root(), options.nproc, options.grace_s,
                          ray=options.ray_cluster(), return_state=True)
    run = trained.result()

    evaluated = bind(evaluate_model, options)(
        run, dataset, prefixes=tuple(options.sample_prefixes), num_tokens=options.sample_tokens,
        temperature=options.sample_temperature, return_state=True)
    evaluation = evaluated.result()

    epochs = read_epochs(run["run_dir"])
    create_markdown_artifact(key="rnnlm-report", markdown=markdown_report(dataset, run, evaluation, epochs),
                             description=f"run {run['id']}: val ppl {evaluation.get('val_ppl')}, test ppl {evaluation.get('test_ppl')}")
    if epochs:
        create_table_artifact(key="rnnlm-epochs", table=epochs_table(epochs), description=f"per-epoch metrics of run {run['id']}")
    return {"run": run, "evaluation": evaluation, "flow_run_id": flow_run_id(),
            "stages": {"train_model": [trained.name], "evaluate_model": [evaluated.name]}}
