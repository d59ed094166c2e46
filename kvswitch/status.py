"""metav1.Condition handling: a condition changes (and gets a new transition time) only when it must."""

from __future__ import annotations

import datetime
from typing import Any


def ready_condition(ok: bool, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    return {
        "type": "Ready",
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message[:32000],
        "observedGeneration": generation or 0,
    }


def merge_condition(
    existing: list[dict[str, Any]] | None, new: dict[str, Any]
) -> list[dict[str, Any]] | None:
    """The new conditions list, or None when nothing but the timestamp would change."""
    conditions = [dict(c) for c in existing or []]
    current = next((c for c in conditions if c.get("type") == new["type"]), None)
    fields = ("status", "reason", "message", "observedGeneration")
    if current is not None and all(current.get(k) == new[k] for k in fields):
        return None
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    updated = {**new, "lastTransitionTime": stamp}
    if current is not None and current.get("status") == new["status"]:
        updated["lastTransitionTime"] = current.get("lastTransitionTime", stamp)
    conditions = [c for c in conditions if c.get("type") != new["type"]] + [updated]
    return conditions
