"""Using a trained model: generate from a run directory or a registered MLflow model.

    generate_from_uri("models:/rnnlm-timemachine-char@champion", "time traveller", 50, seed=0)
"""

from __future__ import annotations

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.tracking import using_tracking


def is_model_uri(text: str) -> bool:
    return text.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def generate_from_uri(model_uri_or_run_dir: str, prefix: str, num_tokens: int = 50, temperature: float = 0.0,
                      top_k: int | None = None, seed: int | None = None, root: str | None = None) -> str:
    """Generate from a run directory or an MLflow model URI (``models:/NAME@champion``,
    ``models:/NAME/3``, ``runs:/ID/model``); returns the prefix followed by the continuation.

    ``seed=None`` with ``temperature > 0`` draws a fresh random seed.
    """
    if is_model_uri(model_uri_or_run_dir):
        import mlflow

        with using_tracking(root):
            model = mlflow.pyfunc.load_model(model_uri_or_run_dir)
        params = {"num_tokens": int(num_tokens), "temperature": float(temperature), "top_k": int(top_k or 0),
                  "seed": -1 if seed is None else int(seed)}
        return model.predict([prefix], params=params)[0]
    from pipeline.lm import LanguageModel

    if not storage.exists(storage.join(model_uri_or_run_dir, "model.pt")):
        raise ConfigError(f"{model_uri_or_run_dir} is neither a run directory (no model.pt) nor a "
                          f"models:/ or runs:/ URI")
    lm = LanguageModel.from_dir(model_uri_or_run_dir)
    return lm.generate(prefix, num_tokens, temperature=temperature, top_k=top_k, seed=seed)
