"""k-vswitch-controller: exactly one VSwitchConfig per Node (``kopf run -m kvswitch.handlers.controller``).

The spec is derived from the Node (podCIDR, InternalIP/ExternalIP) and the controller's settings.
Users tune a node by editing ``overlayType``, ``overlayIP``, ``mtu`` and ``telemetry``: the controller
records what it last wrote in an annotation and leaves a field alone once it differs from that (a
user edit).
"""

from __future__ import annotations

import json
from typing import Any, cast

import kopf
from kubernetes_asyncio import client

from kvswitch.config import GROUP, KIND, PLURAL, VERSION, ControllerSettings
from kvswitch.kube import REQUEST_TIMEOUT, VSwitchConfigs, api_client, call_api, ride_out_api_outages

SETTINGS = ControllerSettings.from_env()
LAST_APPLIED = f"{GROUP}/controller-applied"
USER_TUNABLE = ("overlayType", "overlayIP", "mtu", "telemetry")


class NodeNotReady(Exception):
    """The Node lacks what a VSwitchConfig needs; reported as an Event, retried on the Node's next change."""


def node_overlay_ip(node: dict[str, Any]) -> str | None:
    addresses = (node.get("status") or {}).get("addresses") or []
    for kind in ("InternalIP", "ExternalIP"):
        for a in addresses:
            if a.get("type") == kind and a.get("address") and ":" not in a["address"]:
                return str(a["address"])
    return None


def desired_spec(node: dict[str, Any], settings: ControllerSettings) -> dict[str, Any]:
    pod_cidr = (node.get("spec") or {}).get("podCIDR")
    if not pod_cidr:
        raise NodeNotReady("the Node has no spec.podCIDR yet (is node CIDR allocation on?)")
    overlay_ip = node_overlay_ip(node)
    if overlay_ip is None:
        raise NodeNotReady("the Node has no IPv4 InternalIP or ExternalIP")
    spec: dict[str, Any] = {
        "clusterCIDR": settings.cluster_cidr,
        "podCIDR": pod_cidr,
        "serviceCIDR": settings.service_cidr,
        "overlayType": settings.overlay_type.value,
        "overlayIP": overlay_ip,
        "serviceProxy": settings.service_proxy.value,
    }
    if settings.mtu is not None:
        spec["mtu"] = settings.mtu
    if settings.telemetry is not None:
        spec["telemetry"] = settings.telemetry.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return spec


def spec_patch(
    current: dict[str, Any], last_applied: dict[str, Any], desired: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(merge patch of the spec, what the controller now owns): a tunable whose value differs from
    what the controller last wrote was edited by a user and is left alone."""
    patch: dict[str, Any] = {}
    owned: dict[str, Any] = {}
    for key in sorted(set(desired) | set(last_applied)):
        if key in USER_TUNABLE and current.get(key) != last_applied.get(key):
            if key in last_applied:
                owned[key] = last_applied[key]
            continue
        if current.get(key) != desired.get(key):
            patch[key] = desired.get(key)  # None removes the field
        if key in desired:
            owned[key] = desired[key]
    return patch, owned


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = 30  # warnings and errors become Events
    ride_out_api_outages(settings)
    memo.api = await api_client()
    memo.configs = VSwitchConfigs(memo.api)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    if "api" in memo:
        await memo.api.close()


async def ensure_config(configs: VSwitchConfigs, node: dict[str, Any]) -> None:
    name = node["metadata"]["name"]
    try:
        desired = desired_spec(node, SETTINGS)
    except NodeNotReady as exc:
        kopf.warn(cast(kopf.Body, node), reason="VSwitchConfigPending", message=str(exc))
        return
    current = await configs.get(name)
    if current is None:
        try:
            await configs.create({
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "metadata": {
                    "name": name,
                    "annotations": {LAST_APPLIED: json.dumps(desired, sort_keys=True)},
                    "ownerReferences": [{
                        "apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"]["uid"],
                        "controller": True, "blockOwnerDeletion": False,
                    }],
                },
                "spec": desired,
            })  # fmt: skip
        except client.ApiException as exc:
            # Created meanwhile: by an earlier attempt whose answer was lost, or another replica.
            if exc.status != 409:
                raise
            await ensure_config(configs, node)
            return
        kopf.info(
            cast(kopf.Body, node), reason="VSwitchConfigCreated", message=f"created VSwitchConfig {name}"
        )
        return
    annotations = current["metadata"].get("annotations") or {}
    last = json.loads(annotations.get(LAST_APPLIED, "{}"))
    patch, owned = spec_patch(current.get("spec") or {}, last, desired)
    if patch or owned != last:
        await configs.patch(
            name,
            {"metadata": {"annotations": {LAST_APPLIED: json.dumps(owned, sort_keys=True)}}, "spec": patch},
        )


@kopf.on.event("nodes")
async def node_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    node = dict(cast(dict[str, Any], event["object"]))
    if event["type"] == "DELETED":
        # The ownerReference lets the garbage collector do this; deleting here too covers clusters
        # where the Node was recreated under the same name before GC ran.
        await memo.configs.delete(node["metadata"]["name"])
        return
    await ensure_config(memo.configs, node)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def vswitchconfig_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A VSwitchConfig deleted while its Node exists comes back; a damaged one is refilled."""
    if event["type"] not in ("DELETED", "MODIFIED"):
        return
    name = cast(dict[str, Any], event["object"])["metadata"]["name"]
    core = kopf_core_api(memo)
    try:
        node = await call_api(
            f"read Node {name}", lambda: core.read_node(name, _request_timeout=REQUEST_TIMEOUT)
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return  # no Node, no config
        raise
    await ensure_config(memo.configs, memo.api.sanitize_for_serialization(node))


def kopf_core_api(memo: kopf.Memo) -> Any:
    return client.CoreV1Api(memo.api)
