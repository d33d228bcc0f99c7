"""The MLflow pyfunc of an RNN language model (MLflow "models from code").

``pipeline.registry.packaging`` logs this file as the model's code
(``mlflow.pyfunc.log_model(python_model=<this file>, code_paths=[...], artifacts=...)``);
MLflow copies it into the model and executes it at load time, where
``mlflow.models.set_model`` below names the model object. Nothing here may need the
project to be installed: the ``pipeline`` modules the model uses travel inside it
(``code_paths``) and are imported in ``load_context``, after MLflow has put them on
``sys.path``.

Artifacts (local files inside the model): ``model`` (``model.pt``, a torch state_dict
read with ``weights_only=True``), ``model_config`` (``model_config.json``, with
``backend: torch``) and ``lm`` (``lm.json``: tokenizer config and vocabulary).

Input: a list of prefixes, a DataFrame with a ``prefix`` column (or any single string
column), or ``{"prefix": [...]}``. ``predict``'s input is typed ``TypeFromExample``: MLflow
infers the signature (one unnamed string column, so that a plain list passes) and the
params schema from the input example, enforces it on every input before ``predict`` runs,
and does not warn about a missing type hint. (A ``list[str]`` hint would make the served
model accept only ``{"inputs": [...]}``, refusing the documented ``dataframe_records``.)
``prefixes_of`` then checks what schema enforcement lets through (a mixed list, say).
Params: ``num_tokens`` (int, 50), ``temperature`` (float, 0.0 = greedy), ``top_k``
(int, 0 = no limit), ``seed`` (int, 0; -1 = a fresh random seed; every prefix samples
from its own generator seeded with it). Output: a list of strings, each the prefix as
given followed by its continuation. All prefixes of a request run as one batch; a
request beyond the limits of ``pipeline.model.generate.check_request`` (prefixes, their
length, ``num_tokens``) is refused with INVALID_PARAMETER_VALUE (HTTP 400).

The device is chosen at load time: ``model_config={"device": ...}`` given to
``mlflow.pyfunc.load_model``, else ``$RNNLM_DEVICE``, else ``cpu``; ``auto`` takes the
first CUDA GPU when the loading process has one.
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel
from mlflow.types.type_hints import TypeFromExample

DEFAULT_PARAMS: dict[str, Any] = {"num_tokens": 50, "temperature": 0.0, "top_k": 0, "seed": 0}
DEVICE_ENV = "RNNLM_DEVICE"


def _invalid(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # HTTP 400 when served


def prefixes_of(model_input: Any) -> list[str]:
    """The prefixes in any accepted input shape, validated."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is an mlflow dependency
        pd = None
    if pd is not None and isinstance(model_input, pd.DataFrame):
        if "prefix" in model_input.columns:
            values = model_input["prefix"].tolist()
        elif len(model_input.columns) == 1:
            values = model_input.iloc[:, 0].tolist()
        else:
            raise _invalid(f"expected a 'prefix' column, got columns {list(model_input.columns)}")
    elif pd is not None and isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, dict):
        if set(model_input) != {"prefix"}:
            raise _invalid(f"expected {{'prefix': [...]}}, got keys {sorted(model_input)}")
        values = model_input["prefix"]
        values = [values] if isinstance(values, str) else list(values)
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, (list, tuple)):
        values = list(model_input)
    else:
        try:
            values = list(model_input)  # numpy arrays
        except TypeError:
            raise _invalid(f"unsupported input type {type(model_input).__name__}") from None
    # {"prefix": [...]} arrives from MLflow's schema enforcement as one cell holding the list.
    flat: list[Any] = []
    for v in values:
        if isinstance(v, (list, tuple)) or type(v).__name__ == "ndarray":
            flat.extend(list(v))
        else:
            flat.append(v)
    values = flat
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise _invalid(f"every prefix must be a string, got {bad[:3]!r}")
    return values


def params_of(params: dict[str, Any] | None) -> dict[str, Any]:
    """Generation settings from the request's params, with defaults and checks."""
    p = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    unknown = set(p) - set(DEFAULT_PARAMS)
    if unknown:
        raise _invalid(f"unknown params {sorted(unknown)}; accepted: {sorted(DEFAULT_PARAMS)}")
    try:
        num_tokens, temperature = int(p["num_tokens"]), float(p["temperature"])
        top_k, seed = int(p["top_k"]), int(p["seed"])
    except (TypeError, ValueError) as e:
        raise _invalid(f"bad params {params!r}: {e}") from None
    if top_k < 0:
        raise _invalid(f"top_k must be >= 0 (0 = no limit), got {top_k}")
    if seed < -1:
        raise _invalid(f"seed must be >= 0, or -1 for a fresh random seed; got {seed}")
    settings = {"num_tokens": num_tokens, "temperature": temperature, "top_k": top_k or None,
                "seed": None if seed == -1 else seed}
    from pipeline.model.generate import MAX_NUM_TOKENS, check_settings  # shipped with the model (code_paths)

    try:
        check_settings(**settings, max_num_tokens=MAX_NUM_TOKENS)  # the same rules as `rnnlm generate`
    except ValueError as e:
        raise _invalid(str(e)) from None
    return settings


class RNNLMPyfunc(PythonModel):
    """Generates text from prefixes with an ``pipeline.model.lm.LanguageModel``."""

    lm = None

    def load_context(self, context) -> None:
        from pipeline.model.lm import LanguageModel  # shipped with the model (code_paths)

        a = context.artifacts
        device = (getattr(context, "model_config", None) or {}).get("device") or os.environ.get(DEVICE_ENV) or "cpu"
        self.lm = LanguageModel.from_files(a["model"], a["model_config"], a["lm"], device=device)

    def predict(self, context, model_input: TypeFromExample, params: dict[str, Any] | None = None) -> list[str]:
        from pipeline.model.generate import check_request  # shipped with the model (code_paths)

        prefixes = prefixes_of(model_input)
        settings = params_of(params)
        try:
            check_request(prefixes, settings["num_tokens"])
            return self.lm.generate_many(prefixes, **settings)
        except ValueError as e:  # over a limit, or a prefix with no tokens after normalization
            raise _invalid(str(e)) from None


mlflow.models.set_model(RNNLMPyfunc())
