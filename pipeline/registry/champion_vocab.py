"""Pin a run's vocabulary to the current champion's (``rnnlm run --pin-vocab champion``).

    cfg = pin_to_champion(cfg, "rnnlm-timemachine-char", root)   # data.vocab.pinned = champion's dataset

A growing corpus then keeps producing candidates the gate can compare with the champion
like for like (same token list). The champion's dataset is the ``data.uri`` tag of the
MLflow run behind the champion version; its vocabulary is checked against the version's
``vocab_sha256`` tag. Fail closed: a registry error raises RegistryUnavailableError
(retryable), a champion whose dataset is gone or differs a RegistryError; "no champion"
is only a registry read that positively finds no model or no ``champion`` alias, and
then the run proceeds unpinned (the first night builds the vocabulary the later ones pin).
"""

from __future__ import annotations

import logging

from pipeline.config import RunConfig, parse_config
from pipeline.errors import ConfigError, DatasetError, RegistryError
from pipeline.registry.packaging import CHAMPION
from pipeline.registry.tracking import client, registry_access

log = logging.getLogger(__name__)


@registry_access("pinning the vocabulary to the champion's")
def champion_dataset(name: str, root: str | None = None) -> tuple[str, str, str | None] | None:
    """(URI of the dataset the champion of ``name`` was trained on, its version, its ``vocab_sha256``
    tag), or None without a champion."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    c = client(root)
    try:
        aliases = c.get_registered_model(name).aliases or {}
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        return None  # no registered model of that name: positively no champion
    if CHAMPION not in aliases:
        return None
    mv = c.get_model_version(name, str(aliases[CHAMPION]))
    uri = c.get_run(mv.run_id).data.tags.get("data.uri") if mv.run_id else None
    if not uri:
        raise RegistryError(f"{name} version {mv.version} (champion) records no dataset URI (tag data.uri on "
                            f"MLflow run {mv.run_id}): cannot pin its vocabulary")
    return uri, str(mv.version), mv.tags.get("vocab_sha256")


def pin_to_champion(cfg: RunConfig, name: str, root: str | None = None) -> RunConfig:
    """``cfg`` with ``data.vocab.pinned`` set to the champion of ``name``'s dataset; ``cfg`` itself
    (logged) when ``name`` has no champion yet. ``min_freq``, ``max_size`` and
    ``reserved_tokens`` are dropped: the pinned vocabulary already embodies them."""
    from pipeline.model.lm import vocab_sha256
    from pipeline.data.shards import read_pinned_vocab

    if cfg.data.vocab.pinned is not None:
        raise ConfigError(f"--pin-vocab champion and data.vocab.pinned={cfg.data.vocab.pinned.uri} both pin the "
                          f"vocabulary: choose one")
    found = champion_dataset(name, root)
    if found is None:
        log.warning("--pin-vocab champion: %s has no champion yet, so this run builds its own vocabulary", name)
        return cfg
    uri, version, mv_sha = found
    try:
        vocab, _ = read_pinned_vocab(uri)
    except DatasetError as e:
        raise RegistryError(f"--pin-vocab champion: {name} version {version} (champion) was trained on dataset {uri}, "
                            f"which cannot be read ({e}): restore that dataset (rnnlm prepare with the champion's "
                            f"data config), or run without --pin-vocab") from None
    if mv_sha and vocab_sha256(vocab.tokens) != mv_sha:
        raise RegistryError(f"{name} version {version} (champion): its dataset {uri} holds vocabulary "
                            f"{vocab_sha256(vocab.tokens)[:12]}, the version was trained on {mv_sha[:12]}")
    log.info("vocabulary pinned to %s version %s (champion): %s", name, version, uri)
    raw = cfg.model_dump(mode="json")
    raw["data"]["vocab"].update(pinned={"uri": uri}, min_freq=0, max_size=None, reserved_tokens=[])
    return parse_config(RunConfig, raw, source=f"--pin-vocab champion ({uri})")
