"""The controller's view as metrics: Nodes, VSwitchConfigs by readiness, events handled.

Loaded next to kvswitch.handlers.controller by ``k-vswitch-controller`` (kvswitch.daemons): kopf
runs these event handlers beside the controller's own, on the same watch streams.
"""

from __future__ import annotations

from typing import Any, cast

import kopf

from kvswitch import metrics
from kvswitch.config import GROUP, PLURAL, VERSION

_nodes: set[str] = set()
_ready: dict[str, str] = {}  # VSwitchConfig name -> its Ready condition's status


def _ready_status(obj: dict[str, Any]) -> str:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return str(cond.get("status") or "Unknown")
    return "Unknown"


def _publish() -> None:
    metrics.CONTROLLER_NODES.set(len(_nodes))
    for status in ("True", "False", "Unknown"):
        metrics.CONTROLLER_CONFIGS.labels(ready=status).set(sum(1 for s in _ready.values() if s == status))


@kopf.on.event("nodes")
async def count_node(event: kopf.RawEvent, **_: Any) -> None:
    name = cast(dict[str, Any], event["object"])["metadata"]["name"]
    metrics.CONTROLLER_EVENTS.labels(kind="Node", type=event["type"] or "LISTED").inc()
    if event["type"] == "DELETED":
        _nodes.discard(name)
    else:
        _nodes.add(name)
    _publish()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def count_config(event: kopf.RawEvent, **_: Any) -> None:
    obj = cast(dict[str, Any], event["object"])
    metrics.CONTROLLER_EVENTS.labels(kind="VSwitchConfig", type=event["type"] or "LISTED").inc()
    if event["type"] == "DELETED":
        _ready.pop(obj["metadata"]["name"], None)
    else:
        _ready[obj["metadata"]["name"]] = _ready_status(obj)
    _publish()
