"""The promotion gate: a registered version becomes ``champion`` only if it beats the current one.

    decision = promote_if_better(mv.name, mv.version, dataset)        # maybe alias "champion"

The gate compares perplexities on the *current* held-out split (test, or val when test
is empty), computed with fixed evaluation settings
(``pipeline.lm.EVAL_BATCH_SIZE``/``EVAL_NUM_STEPS``). A version's stored figure is used
when it was trained on this very dataset (its ``dataset_id`` tag); otherwise the model
is loaded from the registry and re-evaluated on the split (token ids mapped through the
two vocabularies; tokens it does not know count as ``<unk>``). Gate decisions are
serialized per model name by a file lock on ``<root>/locks/gate-<name>.lock`` when the
storage root is local; with a remote root wrap ``promote_if_better`` in an
orchestrator-level concurrency limit (the Prefect task does).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from pipeline import storage
from pipeline.errors import RegistryError
from pipeline.packaging import CHAMPION, fmt_ppl
from pipeline.tracking import client, exclusive_lock, using_tracking

log = logging.getLogger(__name__)


@dataclass
class GateDecision:
    name: str
    version: str
    promoted: bool
    split: str  # the held-out split both figures are on
    dataset_id: str  # ... of this dataset
    candidate_ppl: float
    champion_version: str | None  # the champion before the decision
    champion_ppl: float | None
    champion_ppl_source: str | None  # "stored" | "re-evaluated" | None (no champion)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def held_out_split(dataset) -> str:
    """"test", or "val" when the test split is too short to score; RegistryError if neither is."""
    for split in ("test", "val"):
        if dataset.manifest["splits"].get(split, {}).get("num_tokens", 0) >= 2:
            return split
    raise RegistryError(f"dataset {dataset.dataset_id} has neither a test nor a val split of at least 2 tokens")


@contextlib.contextmanager
def gate_lock(name: str, root: str | None = None) -> Iterator[None]:
    """Serialize gate decisions for model ``name`` across processes on this machine.

    A file lock on ``<root>/locks/gate-<name>.lock`` for a local storage root; a no-op
    (with a debug log) for a remote one, where the orchestrator's concurrency limit
    must do it.
    """
    root = storage.storage_root(root)
    if not storage.is_local(root):
        log.debug("storage root %s is remote: gate for %s relies on the orchestrator's lock", root, name)
        yield
        return
    with exclusive_lock(os.path.join(storage.local_path(root), "locks", f"gate-{name}.lock")):
        yield


def load_version_lm(name: str, version: str, root: str | None = None):
    """The LanguageModel inside a registered version (loaded through mlflow.pyfunc)."""
    import mlflow

    with using_tracking(root):
        return mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model().lm


def version_perplexity(c, name: str, mv, dataset, split: str, root: str | None = None) -> tuple[float, str]:
    """(perplexity of version ``mv`` on ``dataset``'s ``split``, "stored" or "re-evaluated").

    The stored figure is used only when the version was trained on this dataset and
    evaluated with the current evaluation settings; otherwise the model is loaded and
    re-evaluated (and the figure cached in a tag ``eval.<dataset_id>.<split>_ppl``).
    """
    from pipeline.lm import EVAL_BATCH_SIZE, EVAL_NUM_STEPS

    tags = mv.tags
    same_eval = tags.get("eval_batch_size") == str(EVAL_BATCH_SIZE) and tags.get("eval_num_steps") == str(EVAL_NUM_STEPS)
    if same_eval and tags.get("dataset_id") == dataset.dataset_id and tags.get(f"{split}_ppl"):
        return float(tags[f"{split}_ppl"]), "stored"
    cache_key = f"eval.{dataset.dataset_id}.{split}_ppl.b{EVAL_BATCH_SIZE}"
    if tags.get(cache_key):
        return float(tags[cache_key]), "re-evaluated"
    lm = load_version_lm(name, str(mv.version), root)
    level = dataset.manifest["tokenizer"]["level"]
    if lm.level != level:
        raise RegistryError(f"{name} version {mv.version} is a {lm.level}-level model; dataset "
                            f"{dataset.dataset_id} is {level}-level: their perplexities are not comparable")
    ppl = lm.perplexity(dataset.split(split), vocab_tokens=dataset.vocab.tokens)
    c.set_model_version_tag(name, mv.version, cache_key, str(ppl))
    return ppl, "re-evaluated"


def promote_if_better(name: str, version: str | int, dataset, *, root: str | None = None,
                      lock: bool = True) -> GateDecision:
    """Make ``version`` the ``champion`` of ``name`` iff its held-out perplexity on ``dataset``
    beats the current champion's on the same split (or there is no champion).

    The split is ``dataset``'s test split (val if test is empty). A champion trained on
    other data is re-evaluated on this split first. The decision and both figures go
    into the version's tags (``gate.*``) and description. ``lock=False`` skips the
    file lock (when the caller already serializes gate decisions).
    """
    version = str(version)
    with (gate_lock(name, root) if lock else contextlib.nullcontext()):
        return _gate(client(root), name, version, dataset, root)


def _gate(c, name: str, version: str, dataset, root: str | None) -> GateDecision:
    from mlflow.exceptions import MlflowException

    split = held_out_split(dataset)
    candidate = c.get_model_version(name, version)
    cand_ppl, cand_source = version_perplexity(c, name, candidate, dataset, split, root)
    try:
        champion = c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None

    champ_ppl = champ_source = None
    if champion is None:
        promoted, reason = True, "no champion yet: the first version becomes champion"
    elif str(champion.version) == version:
        promoted, reason = True, "already the champion"
        champ_ppl, champ_source = cand_ppl, cand_source
    else:
        try:
            champ_ppl, champ_source = version_perplexity(c, name, champion, dataset, split, root)
        except RegistryError as e:
            champ_ppl, champ_source = None, None
            promoted, reason = False, f"champion not comparable ({e}); promote by hand if intended"
        else:
            if not math.isfinite(champ_ppl):
                promoted = True
                reason = f"champion v{champion.version} has a non-finite {split} perplexity"
            else:
                promoted = cand_ppl < champ_ppl
                reason = (f"{split} perplexity {cand_ppl:.4f} {'<' if promoted else '>='} champion "
                          f"v{champion.version}'s {champ_ppl:.4f} ({champ_source})")
    decision = GateDecision(name=name, version=version, promoted=promoted, split=split,
                            dataset_id=dataset.dataset_id, candidate_ppl=cand_ppl,
                            champion_version=None if champion is None else str(champion.version),
                            champion_ppl=champ_ppl, champion_ppl_source=champ_source, reason=reason)
    _record(c, decision, candidate.description or "")
    return decision


def _record(c, d: GateDecision, old_description: str) -> None:
    """The decision in the candidate's tags and description; the champion alias moved if promoted."""
    tags = {"gate.decision": "promoted" if d.promoted else "rejected", "gate.split": d.split,
            "gate.dataset_id": d.dataset_id, "gate.candidate_ppl": str(d.candidate_ppl),
            "gate.champion_version": d.champion_version or "",
            "gate.champion_ppl": "" if d.champion_ppl is None else str(d.champion_ppl),
            "gate.champion_ppl_source": d.champion_ppl_source or "", "gate.reason": d.reason,
            "gate.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for k, v in tags.items():
        c.set_model_version_tag(d.name, d.version, k, v)
    if d.promoted:
        c.set_registered_model_alias(d.name, CHAMPION, d.version)
    verdict = (f"Gate ({tags['gate.time']}): {'PROMOTED to champion' if d.promoted else 'not promoted'}: {d.reason}. "
               f"Candidate {d.split} ppl {d.candidate_ppl:.4f}; champion "
               f"{'none' if d.champion_version is None else 'v' + d.champion_version} {fmt_ppl(d.champion_ppl)} "
               f"on dataset {d.dataset_id}.")
    description = (old_description.replace("Awaiting the gate.", "").strip() + "\n" + verdict).strip()
    c.update_model_version(d.name, d.version, description=description)
    log.info("gate %s v%s: %s", d.name, d.version, verdict)
