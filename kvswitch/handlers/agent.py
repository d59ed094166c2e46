"""k-vswitchd: one per node, run standalone (``kopf run --standalone -m kvswitch.handlers.agent``).

Event handlers only (no finalizers, no state annotations): many agents watch the same objects and
none of them may block another's deletion. The node's own VSwitchConfig drives bridge, gateway,
tunnel and host routes; every other node's config becomes a tunnel route; Pods of this node tell
which attachments are gone; all Pods, Namespaces and NetworkPolicies feed the policy flows.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, cast

import kopf

from kvswitch.config import GROUP, PLURAL, VERSION, AgentSettings, InvalidConfig, parse_spec
from kvswitch.kube import VSwitchConfigs, api_client
from kvswitch.node.agent import NodeAgent
from kvswitch.policy.model import NamespaceInfo, PodInfo, Policy
from kvswitch.services.model import UntranslatableService
from kvswitch.status import merge_condition, ready_condition

log = logging.getLogger(__name__)
SETTINGS = AgentSettings.from_env()


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    report_slow_callbacks(os.environ.get("KVSWITCH_ASYNCIO_DEBUG_SLOW_MS"))
    # Pods are watched cluster-wide: NetworkPolicy peers live on every node.
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
    # Policies before the old round goes: a restarted agent never opens an isolated pod.
    await load_policy_inputs(api, agent)
    await agent.sync_ports()
    await agent.apply_policy()
    # Services too: established connections through a Service keep their endpoints' flows.
    await load_services(api, agent)
    await agent.apply_services()
    await agent.finish_startup()


async def load_services(api: Any, agent: NodeAgent) -> None:
    from kubernetes_asyncio import client

    core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
    for service in (await core.list_service_for_all_namespaces()).items:
        _service(agent, api.sanitize_for_serialization(service), deleted=False, warn=False)
    for eps in (await discovery.list_endpoint_slice_for_all_namespaces()).items:
        raw = api.sanitize_for_serialization(eps)
        agent.set_endpoint_slice(_key(raw), raw)


def report_slow_callbacks(ms: str | None) -> None:
    """With ``ms`` set (tests: KVSWITCH_ASYNCIO_DEBUG_SLOW_MS=100), asyncio's debug mode on this
    loop only: it logs "Executing <callback> took N seconds" for whatever holds the loop that long
    (this loop also serves CNI calls, so nothing on it may block)."""
    if ms:
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = int(ms) / 1000


async def load_policy_inputs(api: Any, agent: NodeAgent) -> None:
    from kubernetes_asyncio import client

    core, net = client.CoreV1Api(api), client.NetworkingV1Api(api)
    pods = [
        PodInfo.parse(api.sanitize_for_serialization(p))
        for p in (await core.list_pod_for_all_namespaces()).items
    ]
    nss = [
        NamespaceInfo.parse(api.sanitize_for_serialization(n)) for n in (await core.list_namespace()).items
    ]
    policies = []
    for obj in (await net.list_network_policy_for_all_namespaces()).items:
        raw = api.sanitize_for_serialization(obj)
        try:
            policies.append(Policy.parse(raw))
        except (KeyError, ValueError, TypeError) as exc:
            log.error("NetworkPolicy %s cannot be parsed, ignoring it: %s", _key(raw), exc)
    agent.replace_policy_inputs(pods, nss, policies)


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
    if agent.is_applied(spec) and _ready_for(obj, generation):
        return
    try:
        mtu = await agent.apply_local(spec)
    except Exception as exc:
        await report(configs, obj, False, "ApplyFailed", str(exc), generation)
        raise
    message = (
        f"bridge {SETTINGS.bridge}, {spec.overlay_type.value} overlay from {spec.overlay_ip}, "
        f"gateway {spec.gateway_ip}, pod MTU {mtu}"
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


@kopf.on.event("pods")
async def pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    obj = cast(dict[str, Any], event["object"])
    deleted = event["type"] == "DELETED"
    _pod(memo.agent, obj, deleted)
    meta, node = obj["metadata"], (obj.get("spec") or {}).get("nodeName")
    if node == SETTINGS.node_name:
        if deleted:
            await memo.agent.pod_deleted(meta.get("namespace", ""), meta["name"])
        else:
            await memo.agent.pod_present(meta.get("namespace", ""), meta["name"])


@kopf.on.event("namespaces")
async def namespace_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _namespace(memo.agent, cast(dict[str, Any], event["object"]), event["type"] == "DELETED")


@kopf.on.event("networking.k8s.io", "v1", "networkpolicies")
async def policy_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _policy(memo.agent, cast(dict[str, Any], event["object"]), event["type"] == "DELETED")


@kopf.on.event("", "v1", "services")
async def service_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _service(memo.agent, cast(dict[str, Any], event["object"]), event["type"] == "DELETED")


@kopf.on.event("discovery.k8s.io", "v1", "endpointslices")
async def endpointslice_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    obj = cast(dict[str, Any], event["object"])
    memo.agent.set_endpoint_slice(_key(obj), None if event["type"] == "DELETED" else obj)


def _service(agent: NodeAgent, obj: dict[str, Any], deleted: bool, warn: bool = True) -> None:
    """An untranslatable Service is skipped with a warning Event; every other Service, and its own
    previous flows, stay as they are."""
    try:
        agent.set_service(_key(obj), None if deleted else obj)
    except UntranslatableService as exc:
        log.error("Service %s cannot be programmed, skipping it: %s", _key(obj), exc)
        if warn and SETTINGS.node_name:
            kopf.warn(
                cast(kopf.Body, obj), reason="ServiceNotProgrammed", message=f"{SETTINGS.node_name}: {exc}"
            )


def _key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace', '')}/{meta['name']}"


def _pod(agent: NodeAgent, obj: dict[str, Any], deleted: bool) -> None:
    agent.set_pod(_key(obj), None if deleted else PodInfo.parse(obj))


def _namespace(agent: NodeAgent, obj: dict[str, Any], deleted: bool) -> None:
    agent.set_namespace(obj["metadata"]["name"], None if deleted else NamespaceInfo.parse(obj))


def _policy(agent: NodeAgent, obj: dict[str, Any], deleted: bool) -> None:
    try:
        policy = None if deleted else Policy.parse(obj)
    except (KeyError, ValueError, TypeError) as exc:
        log.error("NetworkPolicy %s cannot be parsed, ignoring it: %s", _key(obj), exc)
        return
    agent.set_policy(_key(obj), policy)
