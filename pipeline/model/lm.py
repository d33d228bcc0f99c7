"""A language model you can use: weights + vocabulary + tokenizer, in one object.

A run directory written by the trainer holds ``model.pt`` (a state_dict) and
``model_config.json``; ``write_lm_metadata`` adds ``lm.json``, which says how text
becomes tokens for this model (the dataset's tokenizer config and vocabulary)::

    write_lm_metadata(run_dir, dataset)           # once, after training
    lm = LanguageModel.from_dir(run_dir)
    lm.generate("Time Traveller", num_tokens=50)  # -> "Time Traveller" + 50 generated characters
    lm.generate_many(["Time Traveller", "the"], 50)  # one batch, the same texts as one call each
    lm.perplexity(dataset.split("test"))

The prefix is tokenized with the model's own ``TokenizerConfig`` (so the d2l preset
normalizes "Time Traveller" to "time traveller"); tokens missing from the vocabulary
are fed as ``<unk>``, reported by ``generate_with_info`` and logged as a warning (the
continuation of a prefix the model cannot read is not a continuation of that prefix).

Loading a model reads only local files with stdlib + torch + the modules it imports
(``config``, ``errors``, ``models``, ``generate``, ``tokenizer``, ``evaluate``): this
file ships inside self-contained MLflow models (see ``pipeline.registry.mlflow_model``).
Weights are loaded with ``torch.load(weights_only=True)``: a model file is data, never code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import ModelConfig, TokenizerConfig
from pipeline.errors import CheckpointError, ConfigError, GenerationInputError
from pipeline.model.evaluate import EVAL_BATCH_SIZE, EVAL_NUM_STEPS
from pipeline.model.generate import generate_batch, join_tokens
from pipeline.model.models import RNNLM, build_model
from pipeline.data.tokenizer import UNK, tokenize

LM_FILE = "lm.json"
MODEL_FILE = "model.pt"
MODEL_CONFIG_FILE = "model_config.json"
LM_FORMAT = 1

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------- metadata


def vocab_sha256(tokens: list[str] | tuple[str, ...]) -> str:
    """The identity of a vocabulary: sha256 of its tokens in id order, one per line."""
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


def lm_metadata(dataset) -> dict[str, Any]:
    """What ``lm.json`` holds for a model trained on ``dataset`` (a ``pipeline.data.shards.Dataset``)."""
    from pipeline import storage
    from pipeline.data.shards import MANIFEST

    manifest = dataset.manifest
    try:
        manifest_sha256 = storage.sha256_bytes(storage.read_bytes(storage.join(dataset.uri, MANIFEST)))
    except FileNotFoundError:  # an in-memory Dataset: hash the canonical JSON instead
        manifest_sha256 = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    tokens = list(dataset.vocab.tokens)
    tokenizer = TokenizerConfig.model_validate(manifest["tokenizer"])
    return {
        "format": LM_FORMAT,
        "level": tokenizer.level,
        "tokenizer": tokenizer.model_dump(mode="json"),
        "vocab": tokens,
        "vocab_sha256": vocab_sha256(tokens),
        "dataset": {
            "id": dataset.dataset_id,
            "uri": dataset.uri,
            "manifest_sha256": manifest_sha256,
            "sources": [{k: s.get(k) for k in ("source", "sha256", "sha1", "num_bytes")}
                        for s in manifest.get("sources", [])],
        },
    }


def write_lm_metadata(run_dir: str, dataset) -> dict[str, Any]:
    """Write ``lm.json`` into ``run_dir`` (atomically) and return its contents."""
    from pipeline import storage

    meta = lm_metadata(dataset)
    storage.write_json_atomic(storage.join(run_dir, LM_FILE), meta)
    return meta


# --------------------------------------------------------------------------- loading


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to generate on: ``auto`` is the first CUDA GPU when this process has one, else
    the CPU; None is the CPU; ``cuda[:N]`` without CUDA is a ConfigError."""
    name = "cpu" if device is None else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device {name!r} is not a device: {e} (expected cpu, cuda, cuda:N or auto)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: this process has no CUDA GPU (use cpu or auto)")
    return resolved


def _read_bytes(uri: str) -> bytes:
    """Bytes of a local path (no fsspec needed: the serving path) or any storage URI."""
    if "://" not in uri or uri.startswith("file://"):
        with open(uri[len("file://"):] if uri.startswith("file://") else uri, "rb") as f:
            return f.read()
    from pipeline import storage

    return storage.read_bytes(uri)


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if "://" in base else os.path.join(base, name)


def _load_json(uri: str, what: str, hint: str = "") -> dict[str, Any]:
    try:
        data = json.loads(_read_bytes(uri))
    except FileNotFoundError:
        raise CheckpointError(f"{what} {uri} is missing{hint}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {uri} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {uri} must hold a JSON object, got {type(data).__name__}")
    return data


def _load_state_dict(uri: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(_read_bytes(uri)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"model weights {uri} are missing") from None
    except Exception as e:  # truncated file, bad zip, forbidden type: all mean "corrupt"
        raise CheckpointError(f"model weights {uri} cannot be loaded: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"model weights {uri} are not a state_dict of tensors")
    return state


@dataclass
class GenerationResult:
    text: str  # the prefix as given, then the continuation
    continuation: str  # the generated text alone, joined for the level
    prefix_tokens: list[str]  # the prefix after tokenization (what the model saw)
    unknown: list[str]  # prefix tokens not in the vocabulary (fed to the model as <unk>)


class LanguageModel:
    """An ``RNNLM`` with the vocabulary and tokenizer it was trained with."""

    def __init__(self, model: RNNLM, vocab_tokens: list[str], tokenizer: TokenizerConfig,
                 meta: dict[str, Any] | None = None):
        if len(vocab_tokens) != model.vocab_size:
            raise CheckpointError(f"the vocabulary has {len(vocab_tokens)} tokens but the model has "
                                  f"vocab_size {model.vocab_size}")
        if not vocab_tokens or vocab_tokens[0] != UNK:
            raise CheckpointError(f"the vocabulary must start with {UNK!r}")
        self.model = model.eval()
        self.vocab_tokens = list(vocab_tokens)
        self.tokenizer = tokenizer
        self.meta = meta or {}
        self._index = {t: i for i, t in enumerate(self.vocab_tokens)}

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_dir(cls, run_dir: str, device: str | torch.device | None = None,
                 backend: str | None = None) -> "LanguageModel":
        """Load ``model_config.json``, ``model.pt`` and ``lm.json`` from a run directory (path or URI)."""
        run_dir = str(run_dir)
        return cls.from_files(_join(run_dir, MODEL_FILE), _join(run_dir, MODEL_CONFIG_FILE),
                              _join(run_dir, LM_FILE), device=device, backend=backend)

    @classmethod
    def from_files(cls, model_path: str, model_config_path: str, lm_path: str, *,
                   device: str | torch.device | None = None, backend: str | None = None) -> "LanguageModel":
        """Load from three files; ``backend`` overrides the saved one (the state_dicts match);
        ``device``: see ``resolve_device`` (default the CPU)."""
        raw = _load_json(model_config_path, "model config")
        vocab_size = raw.pop("vocab_size", None)
        if not isinstance(vocab_size, int):
            raise CheckpointError(f"model config {model_config_path} has no integer 'vocab_size'")
        if backend is not None:
            raw["backend"] = backend
        try:
            cfg = ModelConfig.model_validate(raw)
        except ValueError as e:
            raise CheckpointError(f"model config {model_config_path} is invalid: {e}") from None
        meta = _load_json(lm_path, "language-model metadata",
                          " (write it with pipeline.model.lm.write_lm_metadata(run_dir, dataset) after training)")
        if meta.get("format") != LM_FORMAT or not isinstance(meta.get("vocab"), list):
            raise CheckpointError(f"language-model metadata {lm_path}: format {meta.get('format')!r} "
                                  f"(expected {LM_FORMAT}) or 'vocab' missing; write it with write_lm_metadata")
        try:
            tokenizer = TokenizerConfig.model_validate(meta["tokenizer"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"language-model metadata {lm_path}: bad tokenizer config: {e}") from None
        if len(meta["vocab"]) != vocab_size:
            raise CheckpointError(f"{lm_path} has a vocabulary of {len(meta['vocab'])} tokens but "
                                  f"{model_config_path} says vocab_size {vocab_size}")
        state = _load_state_dict(model_path)
        model = build_model(cfg, vocab_size)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"model weights {model_path} do not fit {model_config_path}: {e}") from None
        model.to(resolve_device(device))
        return cls(model, meta["vocab"], tokenizer, meta)

    def save(self, directory: str, *, backend: str | None = "torch") -> dict[str, str]:
        """Write ``model.pt``, ``model_config.json`` and ``lm.json`` into a local directory.

        ``backend="torch"`` (the default) saves the config for torch's cuDNN/MKL
        recurrent layers, whatever backend trained it: the state_dicts are the same.
        Returns the three paths by role (``model``, ``model_config``, ``lm``).
        """
        os.makedirs(directory, exist_ok=True)
        cfg = self.model.cfg.model_dump(mode="json")
        if backend is not None:
            cfg["backend"] = backend
        paths = {"model": os.path.join(directory, MODEL_FILE),
                 "model_config": os.path.join(directory, MODEL_CONFIG_FILE),
                 "lm": os.path.join(directory, LM_FILE)}
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, paths["model"])
        with open(paths["model_config"], "w", encoding="utf-8") as f:
            json.dump({**cfg, "vocab_size": self.model.vocab_size}, f, indent=2, sort_keys=True)
        with open(paths["lm"], "w", encoding="utf-8") as f:
            json.dump(self.meta_for_save(), f, indent=2, sort_keys=True)
        return paths

    def meta_for_save(self) -> dict[str, Any]:
        meta = dict(self.meta)
        meta.update({"format": LM_FORMAT, "level": self.tokenizer.level,
                     "tokenizer": self.tokenizer.model_dump(mode="json"), "vocab": self.vocab_tokens})
        return meta

    # -------------------------------------------------------------------- properties

    @property
    def level(self) -> str:
        return self.tokenizer.level

    @property
    def dataset_id(self) -> str | None:
        return (self.meta.get("dataset") or {}).get("id")

    @property
    def device(self) -> torch.device:
        return self.model.embedding.weight.device

    # -------------------------------------------------------------------- generation

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text, self.tokenizer)

    def generate_with_info(self, prefix: str, num_tokens: int = 50, temperature: float = 0.0,
                           top_k: int | None = None, seed: int | None = None) -> GenerationResult:
        """Continue ``prefix`` by ``num_tokens`` tokens; see ``pipeline.model.generate.generate``.

        ``temperature`` 0 is greedy; above 0 samples (``top_k``, ``seed`` apply), and
        the same seed gives the same text on any device. Raises GenerationInputError (a
        ValueError) when the prefix has no tokens after normalization (e.g. only digits
        under ``d2l``) or a setting is out of range; warns when prefix tokens are unknown.
        """
        return self.generate_many_with_info([prefix], num_tokens, temperature, top_k, seed)[0]

    def generate_many_with_info(self, prefixes: Sequence[str], num_tokens: int = 50, temperature: float = 0.0,
                                top_k: int | None = None,
                                seed: int | None | Sequence[int | None] = None) -> list[GenerationResult]:
        """Continue every prefix, as one batch (``pipeline.model.generate.generate_batch``): the same
        results as one ``generate_with_info`` call per prefix. ``seed``: one for every prefix
        (each samples from its own generator seeded with it), or one per prefix."""
        token_lists = []
        for i, prefix in enumerate(prefixes):
            if not isinstance(prefix, str):
                raise GenerationInputError(f"prefix {i} must be a string, got {type(prefix).__name__}")
            tokens = self.tokenize(prefix)
            if not tokens:
                raise GenerationInputError(f"prefix {_shown(prefix)} has no tokens after {self.tokenizer.normalizer!r} "
                                           f"normalization: give at least one letter/word")
            token_lists.append(tokens)
        gens = generate_batch(self.model, self.vocab_tokens, token_lists, num_tokens, temperature=temperature,
                              top_k=top_k, seeds=seed)
        results = []
        for prefix, tokens, gen in zip(prefixes, token_lists, gens):
            if gen.unknown:
                log.warning("prefix %s: %d of its %d tokens are not in the model's vocabulary and are read as %s: %s",
                            _shown(prefix), len(gen.unknown), len(tokens), UNK,
                            " ".join(repr(t) for t in dict.fromkeys(gen.unknown)))
            continuation = join_tokens(gen.tokens, self.level)
            sep = " " if self.level == "word" and prefix and continuation and not prefix[-1].isspace() else ""
            results.append(GenerationResult(text=prefix + sep + continuation, continuation=continuation,
                                            prefix_tokens=tokens, unknown=gen.unknown))
        return results

    def generate(self, prefix: str, num_tokens: int = 50, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None) -> str:
        """The prefix (as given) followed by the generated continuation."""
        return self.generate_with_info(prefix, num_tokens, temperature, top_k, seed).text

    def generate_many(self, prefixes: Sequence[str], num_tokens: int = 50, temperature: float = 0.0,
                      top_k: int | None = None, seed: int | None | Sequence[int | None] = None) -> list[str]:
        """``generate`` for every prefix, as one batch: each prefix followed by its continuation."""
        return [r.text for r in self.generate_many_with_info(prefixes, num_tokens, temperature, top_k, seed)]

    # -------------------------------------------------------------------- evaluation

    def perplexity(self, ids: np.ndarray, *, vocab_tokens: list[str] | tuple[str, ...] | None = None,
                   batch_size: int = EVAL_BATCH_SIZE, num_steps: int = EVAL_NUM_STEPS) -> float:
        """Perplexity on token ids; see ``pipeline.model.evaluate.perplexity``.

        ``vocab_tokens``: the vocabulary ``ids`` are written in, when it is not the
        model's (a split of another dataset): ids are mapped through the tokens into
        this model's vocabulary, tokens it does not know becoming ``<unk>``.
        """
        from pipeline.model.evaluate import perplexity

        ids = np.asarray(ids)
        if vocab_tokens is not None and list(vocab_tokens) != self.vocab_tokens:
            lut = np.array([self._index.get(t, 0) for t in vocab_tokens], dtype=np.int64)
            ids = lut[ids.astype(np.int64)]
        return perplexity(self.model, ids, batch_size=batch_size, num_steps=num_steps)


def _shown(prefix: str, limit: int = 60) -> str:
    """A prefix for a one-line message: its repr, shortened."""
    return repr(prefix) if len(prefix) <= limit else f"{prefix[:limit]!r}... ({len(prefix):,} characters)"
