"""Is a run directory a finished, healthy training? Checked before anything reaches MLflow.

Refused (``UnregistrableRunError``, not retryable): a ``FAILED.json``; a missing ``result.json``,
``model.pt`` or ``model_config.json``; a missing or non-finite validation perplexity;
non-finite weights.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline import storage
from pipeline.errors import RegistryError, UnregistrableRunError


def check_training_succeeded(run_dir: str) -> dict[str, Any]:
    """result.json of a successful training; UnregistrableRunError otherwise."""
    failed = storage.join(run_dir, "FAILED.json")
    if storage.exists(failed):
        try:
            info = storage.read_json(failed)
        except Exception:  # noqa: BLE001 - unreadable is still a failure
            info = {}
        raise UnregistrableRunError(f"training in {run_dir} failed ({info.get('reason', 'unknown reason')}: "
                                  f"{info.get('message', 'see FAILED.json')}); refusing to log or register it")
    try:
        result = storage.read_json(storage.join(run_dir, "result.json"))
    except FileNotFoundError:
        raise UnregistrableRunError(f"{run_dir} has no result.json: training did not finish; "
                                  f"refusing to log or register it") from None
    except ValueError as e:
        raise UnregistrableRunError(f"{run_dir}/result.json is corrupt: {e}") from None
    val = result.get("val_ppl")
    if not isinstance(val, (int, float)) or not math.isfinite(val):
        raise UnregistrableRunError(f"training in {run_dir} has no finite validation perplexity "
                                  f"(val_ppl={val!r}); refusing to log or register it")
    for name in ("model.pt", "model_config.json"):
        if not storage.exists(storage.join(run_dir, name)):
            raise UnregistrableRunError(f"{run_dir} has no {name}; refusing to log or register it")
    return result


def check_finite_weights(lm, run_dir: str) -> None:
    import torch

    bad = [k for k, v in lm.model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UnregistrableRunError(f"the weights in {run_dir}/model.pt are not finite ({', '.join(bad[:3])}); "
                                  f"refusing to log or register them")


def load_run_lm(run_dir: str, dataset=None):
    """The run's LanguageModel, weights checked finite; writes lm.json from ``dataset`` first if missing."""
    from pipeline.model.lm import LM_FILE, LanguageModel, write_lm_metadata

    if not storage.exists(storage.join(run_dir, LM_FILE)):
        if dataset is None:
            raise RegistryError(f"{run_dir} has no {LM_FILE}; call write_lm_metadata(run_dir, dataset)")
        write_lm_metadata(run_dir, dataset)
    lm = LanguageModel.from_dir(run_dir)
    check_finite_weights(lm, run_dir)
    return lm
