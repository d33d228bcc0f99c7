"""The promotion gate: a registered version becomes ``champion`` only if it beats the current
one, like for like.

    decision = promote_if_better(mv.name, mv.version, dataset)        # maybe alias "champion"

Like for like. Both models are scored on the *current* held-out split (test, or val when
test is empty) with fixed evaluation settings (``pipeline.model.evaluate.EVAL_BATCH_SIZE`` /
``EVAL_NUM_STEPS``), and only when both turn text into the very same ids as that dataset:
same tokenizer config, same vocabulary (sha256 of its token list). A version's stored
figure is used when it was trained on this very dataset (its ``dataset_id`` tag);
otherwise it is loaded from the registry and re-evaluated on the split (a champion
trained on an earlier snapshot of a growing corpus with a pinned vocabulary, say). A
champion (or candidate) whose tokenizer or vocabulary differs is "not comparable": a
smaller vocabulary maps more tokens to ``<unk>`` and scores an easier task. Then
``on_incomparable`` decides: ``keep`` the champion (default) or ``promote`` the candidate;
the reason is in the decision, the version's ``gate.*`` tags and its description.

Fail closed. Any registry error (alias lookup, version read, unreachable server, locked
database) raises ``RegistryUnavailableError`` (retryable) and moves no alias; "no
champion" is only ever read from a registered model that positively has no such alias.

Idempotent. A version that already has a recorded decision (``gate.decision``) is not
gated again: its recorded decision is returned with ``decided_before=True``.

Gate decisions are serialized per model name by a file lock on
``<root>/locks/gate-<name>.lock`` when the storage root is local; with a remote root wrap
``promote_if_better`` in an orchestrator-level concurrency limit (the Prefect task does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pipeline.errors import RegistryError
from pipeline.registry.packaging import CHAMPION, fmt_ppl
from pipeline.registry.tracking import client, model_lock, registry_access

log = logging.getLogger(__name__)

OnIncomparable = Literal["keep", "promote"]


@dataclass
class GateDecision:
    name: str
    version: str
    promoted: bool
    split: str  # the held-out split both figures are on
    dataset_id: str  # ... of this dataset
    candidate_ppl: float
    champion_version: str | None  # the champion before the decision
    champion_ppl: float | None  # None: no champion, or not comparable
    champion_ppl_source: str | None  # "stored" | "re-evaluated" | None
    reason: str
    comparable: bool = True  # False: tokenizer or vocabulary differ; on_incomparable decided
    on_incomparable: str = "keep"
    decided_before: bool = False  # the version was gated before: its recorded decision

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def held_out_split(dataset) -> str:
    """"test", or "val" when the test split is too short to score; RegistryError if neither is."""
    for split in ("test", "val"):
        if dataset.manifest["splits"].get(split, {}).get("num_tokens", 0) >= 2:
            return split
    raise RegistryError(f"dataset {dataset.dataset_id} has neither a test nor a val split of at least 2 tokens")


def gate_lock(name: str, root: str | None = None):
    """Serialize gate decisions for model ``name`` across processes on this machine.

    A file lock on ``<root>/locks/gate-<name>.lock`` for a local storage root; a no-op
    (with a debug log) for a remote one, where the orchestrator's concurrency limit
    must do it.
    """
    return model_lock(name, "gate", root)


def load_version_lm(name: str, version: str, root: str | None = None):
    """The LanguageModel inside a registered version (its artifacts, loaded by this project's code)."""
    from pipeline.registry.consumer import load_registered_lm

    return load_registered_lm(f"models:/{name}/{version}", root=root)


# ------------------------------------------------------------------------ like for like


def dataset_tokens_profile(dataset) -> dict[str, str]:
    """How ``dataset`` turns text into ids: its tokenizer config and vocabulary hash."""
    from pipeline.config import TokenizerConfig
    from pipeline.model.lm import vocab_sha256

    tokenizer = TokenizerConfig.model_validate(dataset.manifest["tokenizer"]).model_dump(mode="json")
    return {"tokenizer": json.dumps(tokenizer, sort_keys=True), "vocab_sha256": vocab_sha256(dataset.vocab.tokens)}


def version_tokens_profile(name: str, mv, root: str | None = None) -> dict[str, str]:
    """The same for a registered version: from its tags, or (older versions) from the model itself."""
    if mv.tags.get("tokenizer") and mv.tags.get("vocab_sha256"):
        return {"tokenizer": mv.tags["tokenizer"], "vocab_sha256": mv.tags["vocab_sha256"]}
    meta = load_version_lm(name, str(mv.version), root).meta
    return {"tokenizer": json.dumps(meta["tokenizer"], sort_keys=True), "vocab_sha256": meta["vocab_sha256"]}


def incomparability(who: str, profile: dict[str, str], data: dict[str, str], dataset_id: str) -> str | None:
    """Why ``who`` cannot be scored like for like on the dataset; None when it can."""
    problems = []
    if profile["tokenizer"] != data["tokenizer"]:
        mine, theirs = json.loads(profile["tokenizer"]), json.loads(data["tokenizer"])
        diff = [f"{k} {mine.get(k)!r} vs {theirs.get(k)!r}" for k in sorted({*mine, *theirs}) if mine.get(k) != theirs.get(k)]
        problems.append(f"tokenizer {', '.join(diff)}")
    if profile["vocab_sha256"] != data["vocab_sha256"]:
        problems.append(f"vocabulary sha256 {profile['vocab_sha256'][:12]} vs the dataset's {data['vocab_sha256'][:12]}")
    return f"{who} differs from dataset {dataset_id}: " + "; ".join(problems) if problems else None


def version_perplexity(c, name: str, mv, dataset, split: str, root: str | None = None) -> tuple[float, str]:
    """(perplexity of version ``mv`` on ``dataset``'s ``split``, "stored" or "re-evaluated").

    The stored figure is used only when the version was trained on this dataset and
    evaluated with the current evaluation settings; otherwise the model is loaded and
    re-evaluated (and the figure cached in a tag ``eval.<dataset_id>.<split>_ppl``).
    """
    from pipeline.model.evaluate import EVAL_BATCH_SIZE, EVAL_NUM_STEPS

    tags = mv.tags
    same_eval = tags.get("eval_batch_size") == str(EVAL_BATCH_SIZE) and tags.get("eval_num_steps") == str(EVAL_NUM_STEPS)
    if same_eval and tags.get("dataset_id") == dataset.dataset_id and tags.get(f"{split}_ppl"):
        return float(tags[f"{split}_ppl"]), "stored"
    cache_key = f"eval.{dataset.dataset_id}.{split}_ppl.b{EVAL_BATCH_SIZE}"
    if tags.get(cache_key):
        return float(tags[cache_key]), "re-evaluated"
    lm = load_version_lm(name, str(mv.version), root)
    ppl = lm.perplexity(dataset.split(split), vocab_tokens=dataset.vocab.tokens)
    c.set_model_version_tag(name, mv.version, cache_key, str(ppl))
    return ppl, "re-evaluated"


# -------------------------------------------------------------------------------- gate


@registry_access("the promotion gate")
def promote_if_better(name: str, version: str | int, dataset, *, root: str | None = None,
                      lock: bool = True, on_incomparable: OnIncomparable = "keep") -> GateDecision:
    """Make ``version`` the ``champion`` of ``name`` iff its held-out perplexity on ``dataset``
    beats the current champion's on the same split, like for like (or there is no champion).

    ``on_incomparable``: what to do when the champion's tokenizer or vocabulary differs
    (``keep`` it, or ``promote`` the candidate anyway). The decision and both figures go
    into the version's tags (``gate.*``) and description. ``lock=False`` skips the file
    lock (when the caller already serializes gate decisions). Raises
    RegistryUnavailableError (retryable) on any registry error, with no alias moved.
    """
    if on_incomparable not in ("keep", "promote"):
        raise RegistryError(f"on_incomparable must be 'keep' or 'promote', got {on_incomparable!r}")
    version = str(version)
    with (gate_lock(name, root) if lock else contextlib.nullcontext()):
        return _gate(client(root), name, version, dataset, root, on_incomparable)


def current_champion(c, name: str):
    """The champion version of ``name``, or None when the registered model has no champion alias.

    Read from the registered model's aliases: only a successful read that lacks the alias
    means "no champion"; any error propagates."""
    aliases = c.get_registered_model(name).aliases or {}
    return None if CHAMPION not in aliases else c.get_model_version(name, str(aliases[CHAMPION]))


def _gate(c, name: str, version: str, dataset, root: str | None, on_incomparable: str) -> GateDecision:
    split = held_out_split(dataset)
    candidate = c.get_model_version(name, version)
    if candidate.tags.get("gate.decision"):
        return recorded_decision(candidate)
    champion = current_champion(c, name)
    cand_ppl, cand_source = version_perplexity(c, name, candidate, dataset, split, root)
    d = GateDecision(name=name, version=version, promoted=True, split=split, dataset_id=dataset.dataset_id,
                     candidate_ppl=cand_ppl, champion_version=None if champion is None else str(champion.version),
                     champion_ppl=None, champion_ppl_source=None, reason="", on_incomparable=on_incomparable)
    if champion is None:
        d.reason = "no champion yet: the first version becomes champion"
    elif str(champion.version) == version:
        d.reason, d.champion_ppl, d.champion_ppl_source = "already the champion", cand_ppl, cand_source
    else:
        data = dataset_tokens_profile(dataset)
        problems = [p for p in (
            incomparability(f"candidate v{version}", version_tokens_profile(name, candidate, root), data, d.dataset_id),
            incomparability(f"champion v{champion.version}", version_tokens_profile(name, champion, root), data,
                            d.dataset_id)) if p]
        if problems:
            d.comparable, d.promoted = False, on_incomparable == "promote"
            d.reason = (f"not comparable: {'; '.join(problems)}; "
                        + ("promoted anyway" if d.promoted else f"champion v{champion.version} kept")
                        + f" (gate.on_incomparable={on_incomparable})")
        else:
            d.champion_ppl, d.champion_ppl_source = version_perplexity(c, name, champion, dataset, split, root)
            _compare(d)
    _record(c, d, candidate.description or "")
    return d


def _compare(d: GateDecision) -> None:
    if not math.isfinite(d.champion_ppl):
        d.promoted, d.reason = True, f"champion v{d.champion_version} has a non-finite {d.split} perplexity"
        return
    d.promoted = d.candidate_ppl < d.champion_ppl
    d.reason = (f"{d.split} perplexity {d.candidate_ppl:.4f} {'<' if d.promoted else '>='} champion "
                f"v{d.champion_version}'s {d.champion_ppl:.4f} ({d.champion_ppl_source})")


def _record(c, d: GateDecision, old_description: str) -> None:
    """The alias moved if promoted, then the decision in the candidate's tags and description.

    In this order, and ``gate.decision`` last, so a retry after a failure part-way either
    gates again or finds the complete record."""
    if d.promoted:
        c.set_registered_model_alias(d.name, CHAMPION, d.version)
    tags = {"gate.split": d.split, "gate.dataset_id": d.dataset_id, "gate.candidate_ppl": str(d.candidate_ppl),
            "gate.champion_version": d.champion_version or "",
            "gate.champion_ppl": "" if d.champion_ppl is None else str(d.champion_ppl),
            "gate.champion_ppl_source": d.champion_ppl_source or "", "gate.reason": d.reason,
            "gate.comparable": str(d.comparable).lower(), "gate.on_incomparable": d.on_incomparable,
            "gate.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for k, v in tags.items():
        c.set_model_version_tag(d.name, d.version, k, v)
    verdict = (f"Gate ({tags['gate.time']}): {'PROMOTED to champion' if d.promoted else 'not promoted'}: {d.reason}. "
               f"Candidate {d.split} ppl {d.candidate_ppl:.4f}; champion "
               f"{'none' if d.champion_version is None else 'v' + d.champion_version} {fmt_ppl(d.champion_ppl)} "
               f"on dataset {d.dataset_id}.")
    description = (old_description.replace("Awaiting the gate.", "").strip() + "\n" + verdict).strip()
    c.update_model_version(d.name, d.version, description=description)
    c.set_model_version_tag(d.name, d.version, "gate.decision", "promoted" if d.promoted else "rejected")
    log.info("gate %s v%s: %s", d.name, d.version, verdict)


def recorded_decision(mv) -> GateDecision:
    """The decision recorded in version ``mv``'s ``gate.*`` tags."""
    t = mv.tags

    def num(key: str) -> float | None:
        return float(t[key]) if t.get(key) else None

    log.info("gate %s v%s: decided before (%s): %s", mv.name, mv.version, t.get("gate.time"), t.get("gate.reason"))
    return GateDecision(name=mv.name, version=str(mv.version), promoted=t["gate.decision"] == "promoted",
                        split=t.get("gate.split", ""), dataset_id=t.get("gate.dataset_id", ""),
                        candidate_ppl=num("gate.candidate_ppl"), champion_version=t.get("gate.champion_version") or None,
                        champion_ppl=num("gate.champion_ppl"),
                        champion_ppl_source=t.get("gate.champion_ppl_source") or None,
                        reason=t.get("gate.reason", ""), comparable=t.get("gate.comparable", "true") == "true",
                        on_incomparable=t.get("gate.on_incomparable", "keep"), decided_before=True)
