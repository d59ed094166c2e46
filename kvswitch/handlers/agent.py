"""k-vswitchd: one per node, run standalone (``kopf run --standalone -m kvswitch.handlers.agent``).

Event handlers only (no finalizers, no state annotations): many agents watch the same objects and
none of them may block another's deletion. The node's own VSwitchConfig drives bridge, gateway,
tunnel and host routes; every other node's config becomes a tunnel route; Pods of this node (a
server-side field selector) tell which attachments are gone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import kopf

from kvswitch.config import GROUP, PLURAL, VERSION, AgentSettings, InvalidConfig, parse_spec
from kvswitch.kube import VSwitchConfigs, api_client
from kvswitch.node.agent import NodeAgent
from kvswitch.status import merge_condition, ready_condition

log = logging.getLogger(__name__)
SETTINGS = AgentSettings.from_env()


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.watching.field_selectors["pods"] = f"spec.nodeName={SETTINGS.node_name}"
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 4
    api = await api_client()
    configs = VSwitchConfigs(api)
    agent = NodeAgent(SETTINGS)
    memo.api, memo.configs, memo.agent = api, configs, agent
    await agent.start()
    # Apply every known config before the old flow round is removed: no window without routes.
    for obj in await configs.list():
        await apply_config(agent, configs, obj)
    await agent.finish_startup()


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    if "agent" in memo:
        await memo.agent.stop()
    if "api" in memo:
        await memo.api.close()


async def apply_config(agent: NodeAgent, configs: VSwitchConfigs, obj: dict[str, Any]) -> None:
    """One VSwitchConfig: ours drives the node, the others become tunnel routes."""
    name = obj["metadata"]["name"]
    own = name == SETTINGS.node_name
    generation = obj["metadata"].get("generation")
    try:
        spec = parse_spec(obj.get("spec"))
    except InvalidConfig as exc:
        log.error("VSwitchConfig %s is invalid, keeping the datapath as it is: %s", name, exc)
        if own:
            kopf.warn(cast(kopf.Body, obj), reason="InvalidSpec", message=str(exc))
            await report(configs, obj, False, "InvalidSpec", f"not applied: {exc}", generation)
        return
    if not own:
        await agent.set_remote(name, spec)
        return
    if agent.state.local == spec and _ready_for(obj, generation):
        return
    try:
        await agent.apply_local(spec)
    except Exception as exc:
        await report(configs, obj, False, "ApplyFailed", str(exc), generation)
        raise
    message = (
        f"bridge {SETTINGS.bridge}, {spec.overlay_type.value} overlay from {spec.overlay_ip}, "
        f"gateway {spec.gateway_ip}, pod MTU {await asyncio.to_thread(agent.pod_mtu, spec)}"
    )
    await report(configs, obj, True, "Applied", message, generation)


def _ready_for(obj: dict[str, Any], generation: int | None) -> bool:
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" and c.get("observedGeneration") == generation
        for c in conds
    )


async def report(
    configs: VSwitchConfigs, obj: dict[str, Any], ok: bool, reason: str, message: str, generation: int | None
) -> None:
    status = obj.get("status") or {}
    conditions = merge_condition(status.get("conditions"), ready_condition(ok, reason, message, generation))
    if conditions is None and (not ok or status.get("observedGeneration") == generation):
        return
    patch: dict[str, Any] = {"conditions": conditions or status.get("conditions")}
    if ok:
        patch["observedGeneration"] = generation or 0
    await configs.patch_status(obj["metadata"]["name"], patch)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def vswitchconfig_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    obj = dict(cast(dict[str, Any], event["object"]))
    if event["type"] == "DELETED":
        await memo.agent.set_remote(obj["metadata"]["name"], None)
        return
    await apply_config(memo.agent, memo.configs, obj)


@kopf.on.event("pods", field="spec.nodeName", value=SETTINGS.node_name or kopf.ABSENT)
async def pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    meta = cast(dict[str, Any], event["object"])["metadata"]
    if event["type"] == "DELETED":
        await memo.agent.pod_deleted(meta.get("namespace", ""), meta["name"])
    else:
        await memo.agent.pod_present(meta.get("namespace", ""), meta["name"])
