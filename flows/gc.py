"""The ``gc`` flow: apply the retention policy to a storage root (``rnnlm gc`` as a deployment)."""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow, get_run_logger

from pipeline.config import RetentionConfig


@flow(name="gc", validate_parameters=True)
def gc_flow(policy: RetentionConfig = RetentionConfig(), root: Optional[str] = None,
            apply: bool = False) -> dict[str, Any]:
    """Plan what ``policy`` deletes from ``root`` (default ``$RNNLM_STORAGE``); ``apply`` deletes it.

    Fails (deleting nothing) when the registry, a lease, a lock or a manifest cannot be read.
    """
    from pipeline.store.inventory import take_inventory
    from pipeline.store.retention import apply_plan, plan_retention

    logger = get_run_logger()
    plan = plan_retention(take_inventory(root), policy)
    for d in plan.deletions:
        logger.info("%s %s %s (%d bytes): %s", "delete" if apply else "would delete", d.kind, d.id, d.bytes, d.reason)
    done = apply_plan(plan) if apply else []
    logger.info("%s %d item(s), %d bytes of %d", "deleted" if apply else "would delete",
                len(done if apply else plan.deletions), sum(d.bytes for d in done) if apply else plan.bytes,
                plan.inventory.bytes)
    return {**plan.to_dict(), "applied": apply, "deleted": [d.to_dict() for d in done]}
