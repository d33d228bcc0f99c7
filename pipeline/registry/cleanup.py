"""The registry side of retention: read every registered version, delete the ones past the policy.

Deleting uses MLflow's own APIs: ``delete_model_version``, ``delete_run`` and
``delete_logged_model`` (MLflow 3 keeps a version's model files in a logged model beside its run),
then ``mlflow gc`` for the deleted runs and models: with a database tracking store (the default
SQLite one, or any ``--backend-store-uri``) it removes their artifacts and rows; behind a tracking
server (``http://``) the client deletes their artifacts through the server's artifact proxy and
the rows stay soft-deleted until the server's operator runs ``mlflow gc`` there. Every call fails
closed (``registry_access``): an error is never read as "nothing registered".
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field

from pipeline.registry.tracking import client, registry_access, sqlite_path, tracking_uri, using_tracking

log = logging.getLogger(__name__)

MODEL_PREFIX = "rnnlm-"
PAGE = 1000


@dataclass
class Version:
    """One registered model version and what it references (version -> run -> dataset)."""

    name: str
    version: str
    aliases: list[str]
    run_id: str | None
    model_id: str | None
    run_dir: str | None
    dataset_id: str | None
    created_ms: int
    artifact_uris: list[str] = field(default_factory=list)  # its run's and its logged model's

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "aliases": self.aliases, "run_id": self.run_id,
                "model_id": self.model_id, "run_dir": self.run_dir, "dataset_id": self.dataset_id,
                "created_ms": self.created_ms, "artifact_uris": self.artifact_uris}


def _pages(search, **kwargs):
    token = None
    while True:
        page = search(max_results=PAGE, page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


@registry_access("reading the registered model versions")
def registered_versions(root: str | None = None) -> list[Version]:
    """Every version of every ``rnnlm-*`` registered model, oldest first per model."""
    c = client(root)
    out = []
    for rm in _pages(c.search_registered_models, filter_string=f"name LIKE '{MODEL_PREFIX}%'"):
        aliases: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        versions = list(_pages(c.search_model_versions, filter_string=f"name = '{rm.name}'"))
        for mv in sorted(versions, key=lambda v: int(v.version)):
            model_id = getattr(mv, "model_id", None) or _logged_model_id(mv.source)
            uris = []
            if mv.run_id:
                uris.append(c.get_run(mv.run_id).info.artifact_uri)
            if model_id:
                uris.append(c.get_logged_model(model_id).artifact_location)
            out.append(Version(rm.name, str(mv.version), sorted(aliases.get(str(mv.version), [])), mv.run_id,
                               model_id, mv.tags.get("run_dir"), mv.tags.get("dataset_id"),
                               int(mv.creation_timestamp or 0), uris))
    return out


def _logged_model_id(source: str | None) -> str | None:
    """``m-...`` of a version registered from ``models:/m-...`` (MLflow 3's logged models)."""
    rest = (source or "").removeprefix("models:/")
    return rest if rest != (source or "") and rest.startswith("m-") and "/" not in rest else None


@registry_access("deleting model versions")
def delete_versions(doomed: list[Version], kept: list[Version], root: str | None = None) -> None:
    """Delete ``doomed`` versions, then their runs and logged models (those no ``kept`` version
    shares), then their artifacts (``mlflow gc``). Refuses a version that holds an alias."""
    c = client(root)
    for v in doomed:
        current = c.get_model_version(v.name, v.version)  # re-read: an alias may have moved since the plan
        if getattr(current, "aliases", None):
            raise RuntimeError(f"{v.key} holds alias(es) {current.aliases}: not deleting it")
    run_ids = sorted({v.run_id for v in doomed if v.run_id} - {v.run_id for v in kept})
    model_ids = sorted({v.model_id for v in doomed if v.model_id} - {v.model_id for v in kept})
    for v in doomed:
        c.delete_model_version(v.name, v.version)
        log.info("deleted model version %s", v.key)
    for run_id in run_ids:
        c.delete_run(run_id)
    for model_id in model_ids:
        c.delete_logged_model(model_id)
    purge(run_ids, model_ids, {u for v in doomed for u in v.artifact_uris}, root)


def purge(run_ids: list[str], model_ids: list[str], artifact_uris: set[str], root: str | None = None) -> None:
    """Remove deleted runs' and logged models' artifacts (and, on a database store, their rows)."""
    if not run_ids and not model_ids:
        return
    uri = tracking_uri(root)
    with using_tracking(root):
        if sqlite_path(uri) is not None or not uri.startswith(("http://", "https://", "databricks")):
            from mlflow.cli import gc

            args = ["--backend-store-uri", uri, "--tracking-uri", uri]
            if run_ids:
                args += ["--run-ids", ",".join(run_ids)]
            if model_ids:
                args += ["--logged-model-ids", ",".join(model_ids)]
            echoed = io.StringIO()
            with contextlib.redirect_stdout(echoed):  # stdout is the caller's (rnnlm gc --json)
                gc.main(args, standalone_mode=False)
            for line in echoed.getvalue().splitlines():
                log.info("mlflow gc: %s", line)
            return
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        for artifact_uri in sorted(artifact_uris):
            get_artifact_repository(artifact_uri).delete_artifacts()
