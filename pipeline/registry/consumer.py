"""Using a trained model: generate from a run directory or a registered MLflow model.

    generate_from_uri("models:/rnnlm-timemachine-char@champion", "time traveller", 50, seed=0)
    generate_many_from_uri("models:/rnnlm-timemachine-char@champion", ["time", "the"], 50)  # one batch
"""

from __future__ import annotations

import os
import tempfile

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.registry.tracking import using_tracking


def is_model_uri(text: str) -> bool:
    return text.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def generate_from_uri(model_uri_or_run_dir: str, prefix: str, num_tokens: int = 50, temperature: float = 0.0,
                      top_k: int | None = None, seed: int | None = None, root: str | None = None,
                      device: str = "cpu") -> str:
    """Generate from a run directory or an MLflow model URI (``models:/NAME@champion``,
    ``models:/NAME/3``, ``runs:/ID/model``); returns the prefix followed by the continuation.

    ``seed=None`` with ``temperature > 0`` draws a fresh random seed.
    """
    return generate_many_from_uri(model_uri_or_run_dir, [prefix], num_tokens, temperature, top_k, seed,
                                  root=root, device=device)[0]


def generate_many_from_uri(model_uri_or_run_dir: str, prefixes: list[str], num_tokens: int = 50,
                           temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
                           root: str | None = None, device: str = "cpu") -> list[str]:
    """``generate_from_uri`` for every prefix, as one batch; ``device``: cpu, cuda[:N] or auto."""
    if is_model_uri(model_uri_or_run_dir):
        lm = load_registered_lm(model_uri_or_run_dir, root=root, device=device)
    else:
        from pipeline.model.lm import LanguageModel

        if not storage.exists(storage.join(model_uri_or_run_dir, "model.pt")):
            raise ConfigError(f"{model_uri_or_run_dir} is neither a run directory (no model.pt) nor a "
                              f"models:/ or runs:/ URI")
        lm = LanguageModel.from_dir(model_uri_or_run_dir, device=device)
    return lm.generate_many(prefixes, num_tokens, temperature=temperature, top_k=top_k, seed=seed)


def load_registered_lm(model_uri: str, root: str | None = None, device: str = "cpu"):
    """The LanguageModel inside a logged or registered model (``models:/...``, ``runs:/...``, or the
    model's local directory), loaded by this project's own code from the model's artifacts.

    The code shipped inside a model serves consumers without the project; inside the project a
    model is data (weights, config, tokenizer), so versions registered by any earlier layout of
    ``pipeline`` load here just the same.
    """
    import mlflow
    from mlflow.models import Model

    from pipeline.model.lm import LanguageModel

    with tempfile.TemporaryDirectory() as tmp:
        with using_tracking(root):
            local = mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp)
        artifacts = Model.load(local).flavors["python_function"]["artifacts"]
        path = {key: os.path.join(local, a["path"]) for key, a in artifacts.items()}
        return LanguageModel.from_files(path["model"], path["model_config"], path["lm"], device=device)
