"""The model-registration step: the hook where MLflow registration goes.

``retrain`` calls :func:`register_model` after evaluation when ``options.register_model`` is
true. It is a no-op for now: it logs what it would register and returns
``{"registered": False, ...}``. To wire MLflow, replace the body (log params/metrics
from ``run`` and ``evaluation``, ``mlflow.pytorch.log_model`` or an artifact upload of
``run["run_dir"]``, ``register_model``) and return the model URI and version; keep it
uncached (registration is a side effect; make it idempotent by tagging the MLflow run
with ``run["id"]``).
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task


@task(name="register_model", cache_policy=None, persist_result=False, tags=["register"])
def register_model(run: dict[str, Any], evaluation: dict[str, Any], dataset: dict[str, Any],
                   config: dict[str, Any]) -> dict[str, Any]:
    logger = get_run_logger()
    logger.info("model registration is not configured yet (MLflow hook): would register %s "
                "(val ppl %s, test ppl %s)", run["model_uri"], evaluation.get("val_ppl"), evaluation.get("test_ppl"))
    return {"registered": False, "reason": "registration not implemented", "model_uri": run["model_uri"]}
