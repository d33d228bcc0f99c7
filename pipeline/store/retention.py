"""Retention: which of a root's datasets, runs and registered versions a policy keeps, and deleting the rest.

    inv = take_inventory(root)
    plan = plan_retention(inv, RetentionConfig())   # what would go, and why; nothing deleted
    apply_plan(plan)                                # deletes it (``rnnlm gc --yes``)

What is kept (``RetentionConfig``; docs/retention.md):

* versions: every one holding an alias, then the newest up to ``keep_versions`` per model;
* run directories: those kept versions were trained in, those a live flow leases or a live
  launch locks, unfinished ones touched within ``stale_run_hours``, the newest ``keep_runs``;
  a finished, registered run keeps ``model.pt``, configs, metrics and its newest
  ``finished_run_checkpoints`` checkpoints;
* datasets: those kept runs and versions were trained on, leased ones, the newest ``keep_datasets``
  (all of them while a run whose dataset gc cannot tell is training);
* corpus copies: those kept datasets were made from; ``work/`` outputs and staging directories
  until ``staging_max_age_hours``, quarantine until ``quarantine_max_age_hours`` (corpus and
  ``work/`` sweeps wait while a data stage holds its lock);
* nothing younger than ``min_age_hours``, and nothing written since a live lease began.

The plan is made from a complete inventory before anything is deleted, so an unreadable
registry, lease, lock or manifest deletes nothing. Deleting: the registry first (MLflow's own
APIs, ``pipeline.registry.cleanup``), then files; a run directory is deleted holding its lock.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.config import RetentionConfig
from pipeline.registry.cleanup import Version, delete_versions
from pipeline.store.inventory import Inventory, Item

log = logging.getLogger(__name__)
HOUR = 3600.0


@dataclass
class Deletion:
    kind: str  # version, run, checkpoints, dataset, corpus, work, staging, quarantine, lease
    id: str
    uri: str | None
    bytes: int
    reason: str
    paths: list[str] = field(default_factory=list)  # for checkpoints: the files under root

    def to_dict(self) -> dict:
        return {"kind": self.kind, "id": self.id, "uri": self.uri, "bytes": self.bytes, "reason": self.reason}


@dataclass
class Plan:
    inventory: Inventory
    policy: RetentionConfig
    deletions: list[Deletion]
    kept: dict[str, str]  # "<kind>:<id>" -> why it stays (for the things that might have gone)
    doomed_versions: list[Version]
    kept_versions: list[Version]

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.deletions)

    def to_dict(self) -> dict:
        return {"root": self.inventory.root, "bytes": self.bytes, "store_bytes": self.inventory.bytes,
                "deletions": [d.to_dict() for d in self.deletions], "kept": self.kept,
                "policy": self.policy.model_dump(mode="json")}


def plan_retention(inv: Inventory, policy: RetentionConfig) -> Plan:
    """What ``policy`` deletes from ``inv``, and why each thing that stays stays."""
    now, kept, deletions = inv.now, {}, []
    live = [le for le in inv.leases if not le.is_stale(now, policy.lease_max_age_hours * HOUR)]
    live_since = min((le.since for le in live), default=None)

    def young(item: Item) -> str | None:
        if item.age_h(now) < policy.min_age_hours:
            return f"younger than min_age_hours={policy.min_age_hours:g}"
        if live_since is not None and item.mtime >= live_since:
            return "written since a running flow's lease began"
        return None

    # versions: aliased first, then the newest, up to keep_versions per model
    kept_versions, doomed_versions = [], []
    by_model: dict[str, list[Version]] = {}
    for v in inv.versions:
        by_model.setdefault(v.name, []).append(v)
    for name, versions in by_model.items():
        newest_first = sorted(versions, key=lambda v: int(v.version), reverse=True)
        keep = [v for v in newest_first if v.aliases]
        keep += [v for v in newest_first if not v.aliases][:max(0, policy.keep_versions - len(keep))]
        for v in newest_first:
            if v in keep:
                kept[f"version:{v.key}"] = f"alias {', '.join(v.aliases)}" if v.aliases else \
                    f"among the newest {policy.keep_versions}"
                kept_versions.append(v)
            else:
                doomed_versions.append(v)
                deletions.append(Deletion("version", v.key, None, 0, f"past keep_versions={policy.keep_versions}"
                                          f" (run {v.run_id}, model {v.model_id}; artifacts purged)"))

    # run directories
    leased_runs = {r for le in live for r in le.runs}
    leased_datasets = {d for le in live for d in le.datasets}
    run_of = {_run_id(v.run_dir): v for v in kept_versions if v.run_dir}
    doomed_run_of = {_run_id(v.run_dir): v for v in doomed_versions if v.run_dir}
    newest_runs = [r.id for r in sorted(inv.runs.values(), key=lambda r: r.mtime, reverse=True)][:policy.keep_runs]
    kept_runs = []
    for run in sorted(inv.runs.values(), key=lambda r: r.mtime, reverse=True):
        state = run.refs.get("state")
        why = None
        if run.id in run_of:
            why = f"trained {run_of[run.id].key}"
        elif run.id in leased_runs:
            why = "leased by a running flow"
        elif state == "training":
            why = "a live launch holds its lock"
        elif state == "unfinished" and run.age_h(now) < policy.stale_run_hours:
            why = f"unfinished, touched within stale_run_hours={policy.stale_run_hours:g}"
        elif run.id in newest_runs and run.id not in doomed_run_of:
            why = f"among the newest {policy.keep_runs} runs"
        else:
            why = young(run)
        if why:
            kept[f"run:{run.id}"] = why
            kept_runs.append(run)
            if run.id in run_of and state == "finished":
                ckpts = run.refs.get("checkpoints", [])
                extra = ckpts[:max(0, len(ckpts) - policy.finished_run_checkpoints)]
                if extra:
                    sizes = dict(run.files)
                    deletions.append(Deletion("checkpoints", run.id, run.uri, sum(sizes[p] for p in extra),
                                              f"finished and registered ({run_of[run.id].key}): keeps "
                                              f"{policy.finished_run_checkpoints} checkpoint(s)", paths=extra))
            continue
        reason = f"its version {doomed_run_of[run.id].key} goes" if run.id in doomed_run_of else \
            f"{state}, not among the newest {policy.keep_runs} runs, no kept version"
        deletions.append(Deletion("run", run.id, run.uri, run.bytes, reason))

    # datasets
    needed = {v.dataset_id: f"dataset of {v.key}" for v in kept_versions if v.dataset_id}
    unknown = [r.id for r in kept_runs if not r.refs.get("dataset") and r.refs.get("state") in ("training", "unfinished")]
    for r in kept_runs:
        if r.refs.get("dataset"):
            needed.setdefault(r.refs["dataset"], f"dataset of run {r.id}")
    newest_datasets = [d.id for d in sorted(inv.datasets.values(), key=lambda d: d.mtime, reverse=True)]
    newest_datasets = newest_datasets[:policy.keep_datasets]
    kept_datasets = []
    for ds in inv.datasets.values():
        why = needed.get(ds.id) or ("leased by a running flow" if ds.id in leased_datasets else None)
        why = why or (f"run {unknown[0]} is in progress and its dataset is not known yet" if unknown else None)
        why = why or (f"among the newest {policy.keep_datasets} datasets" if ds.id in newest_datasets else None)
        why = why or young(ds)
        if why:
            kept[f"dataset:{ds.id}"] = why
            kept_datasets.append(ds)
        else:
            deletions.append(Deletion("dataset", ds.id, ds.uri, ds.bytes, "no kept run or version uses it, "
                                      f"not among the newest {policy.keep_datasets} datasets"))

    # corpus copies, work/ outputs, staging, quarantine, stale leases
    sources = {s for d in kept_datasets for s in d.refs.get("sources", [])}
    stage_busy = f"a data stage holds lock {inv.stage_locks[0]}" if inv.stage_locks else None
    for item in inv.other:
        age = item.age_h(now)
        if item.kind == "corpus":
            sha = item.id.split(".", 1)[0]
            why = ("a kept dataset was made from it" if sha in sources else None) or stage_busy or young(item)
            reason = "no kept dataset was made from it"
        elif item.kind in ("work", "staging"):
            limit = policy.staging_max_age_hours
            why = (f"younger than staging_max_age_hours={limit:g}" if age < limit else None) or stage_busy or young(item)
            reason = f"{'an intermediate stage output' if item.kind == 'work' else 'left by an unfinished write'}, " \
                     f"older than {limit:g} h"
        else:  # quarantine
            limit = policy.quarantine_max_age_hours
            why = f"younger than quarantine_max_age_hours={limit:g}" if age < limit else None
            reason = f"quarantined more than {limit:g} h ago"
        if why:
            kept[f"{item.kind}:{item.id}"] = why
        else:
            deletions.append(Deletion(item.kind, item.id, item.uri, item.bytes, reason))
    for le in inv.leases:
        if le not in live:
            deletions.append(Deletion("lease", le.uri.rsplit("/", 1)[-1], le.uri, 0, f"stale (holder {le.holder})"))
    return Plan(inv, policy, deletions, kept, doomed_versions, kept_versions)


def _run_id(run_dir: str) -> str:
    return str(run_dir).rstrip("/").replace(os.sep, "/").rsplit("/", 1)[-1]


def apply_plan(plan: Plan) -> list[Deletion]:
    """Delete what ``plan`` lists: registry first, then files. Returns what was deleted; a run
    directory whose lock a launch took since the plan was made is skipped."""
    done = []
    if plan.doomed_versions:
        delete_versions(plan.doomed_versions, plan.kept_versions, plan.inventory.root)
        done += [d for d in plan.deletions if d.kind == "version"]
    for d in plan.deletions:
        if d.kind == "version":
            continue
        if d.kind == "checkpoints":
            for rel in d.paths:
                _remove(storage.join(plan.inventory.root, *rel.split("/")))
        elif d.kind == "run":
            if not _remove_run(d.uri):
                log.warning("run %s: a launch took its lock since the plan; kept", d.uri)
                continue
        else:
            _remove(d.uri)
        log.info("deleted %s %s (%d bytes): %s", d.kind, d.id, d.bytes, d.reason)
        done.append(d)
    return done


def _remove(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def _remove_run(uri: str) -> bool:
    """Delete a run directory, holding its launch lock (local roots) so no training starts in it meanwhile."""
    if not storage.is_local(uri):
        _remove(uri)
        return True
    import filelock

    from pipeline.training.launch import LOCK_FILE

    path = storage.local_path(uri)
    lock = filelock.FileLock(os.path.join(path, LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return False
    try:
        for entry in os.listdir(path):
            if entry != LOCK_FILE:
                _remove(os.path.join(path, entry))
    finally:
        lock.release()
    _remove(uri)
    return True
