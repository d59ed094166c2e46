"""kube-controller-manager's EndpointSlice controller, for the fake API server.

For every Service with a selector (not ExternalName), EndpointSlices list the matching pods of its
namespace, as upstream's reconciler (k8s.io/endpointslice) writes them:

- pods are left out when terminal (Succeeded/Failed), without an IP, or on a node that does not
  exist (unless ``publishNotReadyAddresses``); terminating pods stay, with their conditions;
- an endpoint: ``addresses`` (the pod IPs of the slice's family), ``conditions`` (``serving`` = the
  pod's Ready condition, ``terminating`` = ``metadata.deletionTimestamp`` is set, ``ready`` = serving
  and not terminating, or ``publishNotReadyAddresses``), ``nodeName``, ``zone`` (the node's
  ``topology.kubernetes.io/zone``), ``hostname`` (pods whose ``subdomain`` is the Service), and
  ``targetRef`` to the pod;
- ports: the Service's, with named targetPorts resolved per pod (a pod lacking the name loses that
  port), so pods resolving to different numbers land in different slices; one slice group per port
  set and address type (``spec.ipFamilies``), at most ``max_endpoints_per_slice`` (100) endpoints a
  slice; endpoints stay in their slice across updates, new ones fill the fullest slices first;
- slices are named ``<service>-<random>``, labelled ``kubernetes.io/service-name``,
  ``endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io`` (plus the Service's own
  labels, and ``service.kubernetes.io/headless`` for headless Services) and owned by the Service (the
  garbage collector deletes them with it); a Service without endpoints keeps one empty placeholder;
- slices of other controllers are left alone; edits to managed slices are reverted.

It runs in the API server's event loop and reads and writes its store directly (no HTTP), reacting to
every change of Services, pods, nodes and EndpointSlices, whoever made it (HTTP clients included)::

    controller = EndpointSliceController(server)          # an ApiServer, in its loop
    await controller.start()
    api.run(EndpointSliceController(api.server).start())  # an ApiServerThread, from outside
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import kmock

from kvswitch_testbed.apiserver import ApiServer, Emulator
from kvswitch_testbed.apiserver_types import JSON, PODS, SERVICES, Change, ResourceSpec, Watcher, now

logger = logging.getLogger(__name__)

SLICES = kmock.resource("discovery.k8s.io", "v1", "endpointslices")
NODES = kmock.resource("", "v1", "nodes")
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
LABEL_HEADLESS = "service.kubernetes.io/headless"
LABEL_ZONE = "topology.kubernetes.io/zone"
CONTROLLER_NAME = "endpointslice-controller.k8s.io"
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
_RESERVED_LABELS = (LABEL_SERVICE_NAME, LABEL_MANAGED_BY, LABEL_HEADLESS)
MANAGED = f"{LABEL_MANAGED_BY}={CONTROLLER_NAME}"  # a label selector

EndpointKey = tuple[tuple[str, ...], str, str, str]  # addresses, hostname, pod namespace, pod name


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = obj.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def _status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    status = obj.get("status")
    return status if isinstance(status, Mapping) else {}


def selects(selector: Mapping[str, Any], obj: Mapping[str, Any] | None) -> bool:
    """A Service selector (a map: every pair must be a label of the object)."""
    if obj is None:
        return False
    labels = _meta(obj).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = _status(pod).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_ips(pod: Mapping[str, Any]) -> list[str]:
    """``status.podIPs``, or ``[status.podIP]`` as the API's conversion fills it in."""
    status = _status(pod)
    ips = [str(p.get("ip")) for p in status.get("podIPs") or [] if isinstance(p, Mapping) and p.get("ip")]
    return ips or ([str(status["podIP"])] if status.get("podIP") else [])


def address_types(service: Mapping[str, Any]) -> list[str]:
    """``getAddressTypesForService``: the Service's IP families (guessed from its clusterIP if unset)."""
    spec = _spec(service)
    families = [f for f in spec.get("ipFamilies") or [] if f in ("IPv4", "IPv6")]
    if families:
        return sorted(set(families))
    cluster_ip = spec.get("clusterIP") or ""
    if cluster_ip and cluster_ip != "None":
        return ["IPv6" if ":" in cluster_ip else "IPv4"]
    return ["IPv4", "IPv6"]


def find_port(pod: Mapping[str, Any], service_port: Mapping[str, Any]) -> int | None:
    """``FindPort``: a numeric targetPort as is, a named one from the pod's containers (same protocol)."""
    target = service_port.get("targetPort", service_port.get("port"))
    if isinstance(target, int) and not isinstance(target, bool):
        return target
    protocol = service_port.get("protocol") or "TCP"
    pod_spec = _spec(pod)
    sidecars = [c for c in pod_spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    for container in [*(pod_spec.get("containers") or []), *sidecars]:
        for port in container.get("ports") or []:
            if port.get("name") == target and (port.get("protocol") or "TCP") == protocol:
                number = port.get("containerPort")
                return int(number) if isinstance(number, int) else None
    return None


def endpoint_ports(service: Mapping[str, Any], pod: Mapping[str, Any]) -> list[JSON]:
    ports: list[JSON] = []
    for service_port in _spec(service).get("ports") or []:
        number = find_port(pod, service_port)
        if number is None:
            continue
        port: JSON = {
            "name": service_port.get("name") or "",
            "port": number,
            "protocol": service_port.get("protocol") or "TCP",
        }
        if service_port.get("appProtocol"):
            port["appProtocol"] = service_port["appProtocol"]
        ports.append(port)
    return ports


def port_key(ports: Iterable[Mapping[str, Any]] | None) -> str:
    """``NewPortMapKey``: the same set of ports, whatever their order."""
    return json.dumps(sorted(ports or [], key=lambda p: str(p.get("name") or "")), sort_keys=True)


def endpoint_key(endpoint: Mapping[str, Any]) -> EndpointKey:
    """What identifies an endpoint across updates (upstream's endpoint hash)."""
    ref = endpoint.get("targetRef") or {}
    return (
        tuple(endpoint.get("addresses") or ()),
        str(endpoint.get("hostname") or ""),
        str(ref.get("namespace") or ""),
        str(ref.get("name") or ""),
    )


def _of_family(ip: str, address_type: str) -> bool:
    try:
        version = ipaddress.ip_address(ip).version
    except ValueError:
        return False
    return (version == 6) == (address_type == "IPv6")


def pod_endpoint(
    pod: Mapping[str, Any], node: Mapping[str, Any] | None, service: Mapping[str, Any], address_type: str
) -> JSON:
    """``podToEndpoint``."""
    meta, pod_spec, svc_spec = _meta(pod), _spec(pod), _spec(service)
    serving = pod_ready(pod)
    terminating = bool(meta.get("deletionTimestamp"))
    ready = bool(svc_spec.get("publishNotReadyAddresses")) or (serving and not terminating)
    endpoint: JSON = {
        "addresses": [ip for ip in pod_ips(pod) if _of_family(ip, address_type)],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "targetRef": {
            "kind": "Pod",
            "namespace": meta.get("namespace"),
            "name": meta.get("name"),
            "uid": meta.get("uid"),
        },
    }
    if pod_spec.get("nodeName"):
        endpoint["nodeName"] = pod_spec["nodeName"]
    zone = (_meta(node).get("labels") or {}).get(LABEL_ZONE) if node is not None else None
    if zone:
        endpoint["zone"] = zone
    same_service = _meta(service).get("name") == pod_spec.get("subdomain")
    if pod_spec.get("hostname") and same_service and _meta(service).get("namespace") == meta.get("namespace"):
        endpoint["hostname"] = pod_spec["hostname"]
    return endpoint


def slice_labels(service: Mapping[str, Any]) -> dict[str, str]:
    """``setEndpointSliceLabels``: the Service's labels but the reserved ones, then those."""
    labels = {k: v for k, v in (_meta(service).get("labels") or {}).items() if k not in _RESERVED_LABELS}
    if _spec(service).get("clusterIP") in (None, "", "None"):
        labels[LABEL_HEADLESS] = ""
    labels[LABEL_SERVICE_NAME] = _meta(service)["name"]
    labels[LABEL_MANAGED_BY] = CONTROLLER_NAME
    return labels


def _visible_labels(labels: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (labels or {}).items() if k not in _RESERVED_LABELS}


def owned_by(endpoint_slice: Mapping[str, Any], service: Mapping[str, Any]) -> bool:
    uid = _meta(service).get("uid")
    return any(
        o.get("uid") == uid and o.get("kind") == "Service" and o.get("apiVersion") == "v1"
        for o in _meta(endpoint_slice).get("ownerReferences") or []
    )


class EndpointSliceController:
    """Keeps EndpointSlices of selector-based Services in step with their pods; see the module docstring."""

    def __init__(self, server: ApiServer | Emulator, *, max_endpoints_per_slice: int = 100) -> None:
        self.emulator = server.emulator if isinstance(server, ApiServer) else server
        self.max_endpoints_per_slice = max_endpoints_per_slice
        self.errors: list[Exception] = []  # failed reconciliations; a passing test expects none
        self._watchers: list[Watcher] = []
        self._task: asyncio.Task[None] | None = None

    def _rspec(self, ref: kmock.resource) -> ResourceSpec:
        return self.emulator.spec(ref)

    # ---------------------------------------------------------------- running

    async def start(self) -> None:
        """Subscribe, reconcile every Service, then follow changes; call it in the server's loop."""
        if self._task is not None:
            raise RuntimeError("the EndpointSlice controller is already started")
        queue: asyncio.Queue[Change | None] = asyncio.Queue()
        self._watchers = [self.emulator.subscribe(ref, queue) for ref in (SERVICES, PODS, NODES, SLICES)]
        self.sync_all()
        self._task = asyncio.create_task(self._run(queue), name="endpointslice-controller")

    async def stop(self) -> None:
        for watcher in self._watchers:
            self.emulator.unsubscribe(watcher)
        self._watchers = []
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, queue: asyncio.Queue[Change | None]) -> None:
        while True:
            batch = [await queue.get()]
            while not queue.empty():  # coalesce a burst (a namespace drain, a kubectl apply -f dir)
                batch.append(queue.get_nowait())
            if any(change is None for change in batch):
                return  # the server is stopping
            todo: dict[tuple[str, str], None] = {}
            for change in batch:
                assert change is not None
                for key in self._affected(change):
                    todo[key] = None
            for namespace, name in todo:
                self.sync_service(namespace, name)

    def _affected(self, change: Change) -> list[tuple[str, str]]:
        """The Services whose slices a change may alter."""
        meta = _meta(change.obj)
        if change.ref == SERVICES:
            return [] if change.type == "DELETED" else [(meta["namespace"], meta["name"])]
        if change.ref == SLICES:
            labels = meta.get("labels") or {}
            if labels.get(LABEL_MANAGED_BY) == CONTROLLER_NAME and labels.get(LABEL_SERVICE_NAME):
                return [(meta["namespace"], labels[LABEL_SERVICE_NAME])]
            return []
        if change.ref == NODES:
            old_labels = (_meta(change.old).get("labels") or {}) if change.old is not None else {}
            new_labels = meta.get("labels") or {}
            if change.type == "MODIFIED" and old_labels.get(LABEL_ZONE) == new_labels.get(LABEL_ZONE):
                return []
            return [self._key(s) for s in self._services(None)]
        namespace = meta.get("namespace")
        return [
            self._key(s)
            for s in self._services(namespace)
            if (selector := _spec(s).get("selector"))
            and (selects(selector, change.obj) or selects(selector, change.old))
        ]

    @staticmethod
    def _key(service: Mapping[str, Any]) -> tuple[str, str]:
        return (_meta(service)["namespace"], _meta(service)["name"])

    def _services(self, namespace: str | None) -> list[JSON]:
        """Services of a namespace (of all with None), as stored: not to be modified."""
        items: list[JSON] = self.emulator.list_objects(self._rspec(SERVICES), namespace)["items"]
        return items

    # ---------------------------------------------------------------- reconciling

    def sync_all(self) -> None:
        for service in self._services(None):
            self.sync_service(*self._key(service))

    def sync_service(self, namespace: str, name: str) -> None:
        """Reconcile one Service's slices now (synchronously, in the server's loop)."""
        service = self.emulator.lookup(self._rspec(SERVICES), namespace, name)
        if (
            service is None
            or _spec(service).get("type") == "ExternalName"
            or not _spec(service).get("selector")
        ):
            return  # upstream leaves such Services' slices alone (the garbage collector takes them)
        try:
            self._reconcile(service)
        except kmock.KubernetesError as e:
            logger.warning("EndpointSlices of %s/%s: %s", namespace, name, e.message)
            self.errors.append(e)

    def _reconcile(self, service: JSON) -> None:
        namespace = _meta(service)["namespace"]
        selector = _spec(service)["selector"]
        pods = [
            p
            for p in self.emulator.list_objects(self._rspec(PODS), namespace)["items"]
            if selects(selector, p)
        ]
        existing = self.emulator.list_objects(
            self._rspec(SLICES),
            namespace,
            {"labelSelector": f"{LABEL_SERVICE_NAME}={_meta(service)['name']},{MANAGED}"},
        )["items"]
        families = address_types(service)
        to_create: list[JSON] = []
        to_update: list[JSON] = []
        to_delete: list[JSON] = [s for s in existing if s.get("addressType") not in families]
        for address_type in families:
            mine = [s for s in existing if s.get("addressType") == address_type]
            created, updated, deleted = self._reconcile_family(service, pods, mine, address_type)
            to_create += created
            to_update += updated
            to_delete += deleted
        self._finalize(service, to_create, to_update, to_delete)

    def _desired(
        self, service: JSON, pods: list[JSON], address_type: str
    ) -> tuple[dict[str, list[JSON]], dict[str, dict[EndpointKey, JSON]]]:
        """Ports and endpoints wanted, grouped by port set."""
        ports_by_key: dict[str, list[JSON]] = {}
        wanted: dict[str, dict[EndpointKey, JSON]] = {}
        publish = bool(_spec(service).get("publishNotReadyAddresses"))
        nodes = self._rspec(NODES)
        for pod in sorted(pods, key=lambda p: _meta(p)["name"]):
            if _status(pod).get("phase") in ("Succeeded", "Failed") or not pod_ips(pod):
                continue
            node = self.emulator.lookup(nodes, None, str(_spec(pod).get("nodeName") or ""))
            if node is None and not publish:
                continue
            ports = endpoint_ports(service, pod)
            key = port_key(ports)
            ports_by_key.setdefault(key, ports)
            endpoint = pod_endpoint(pod, node, service, address_type)
            if endpoint["addresses"]:
                wanted.setdefault(key, {})[endpoint_key(endpoint)] = endpoint
        return ports_by_key, wanted

    def _new_slice(self, service: JSON, ports: list[JSON], address_type: str) -> JSON:
        meta = _meta(service)
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "generateName": f"{meta['name']}-",
                "namespace": meta["namespace"],
                "labels": slice_labels(service),
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "addressType": address_type,
            "endpoints": [],
            "ports": copy.deepcopy(ports),
        }

    def _reconcile_family(
        self, service: JSON, pods: list[JSON], existing: list[JSON], address_type: str
    ) -> tuple[list[JSON], list[JSON], list[JSON]]:
        """``reconcileByAddressType``: slices to create, update and delete for one address type."""
        to_create: list[JSON] = []
        to_update: list[JSON] = []
        to_delete = [s for s in existing if not owned_by(s, service)]
        by_ports: dict[str, list[JSON]] = {}
        for endpoint_slice in existing:
            if owned_by(endpoint_slice, service):
                by_ports.setdefault(port_key(endpoint_slice.get("ports")), []).append(endpoint_slice)
        ports_by_key, wanted = self._desired(service, pods, address_type)
        for key, endpoints in wanted.items():
            created, updated, deleted = self._reconcile_ports(
                service, by_ports.get(key, []), endpoints, ports_by_key[key], address_type
            )
            to_create += created
            to_update += updated
            to_delete += deleted
        for key, slices in by_ports.items():
            if key not in wanted:
                to_delete += slices
        if len(existing) == len(to_delete) and not to_create:  # nothing left: one empty placeholder
            placeholder = self._new_slice(service, [], address_type)
            if len(to_delete) == 1 and self._same_placeholder(to_delete[0], placeholder):
                to_delete = []
            else:
                to_create.append(placeholder)
        return to_create, to_update, to_delete

    @staticmethod
    def _same_placeholder(stored: Mapping[str, Any], placeholder: Mapping[str, Any]) -> bool:
        a, b = _meta(stored), _meta(placeholder)
        return (
            (a.get("labels") or {}) == b["labels"]
            and [dict(o) for o in a.get("ownerReferences") or []] == b["ownerReferences"]
            and not stored.get("endpoints")
            and not stored.get("ports")
            and stored.get("addressType") == placeholder["addressType"]
        )

    def _reconcile_ports(
        self,
        service: JSON,
        existing: list[JSON],
        wanted: dict[EndpointKey, JSON],
        ports: list[JSON],
        address_type: str,
    ) -> tuple[list[JSON], list[JSON], list[JSON]]:
        """``reconcileByPortMapping``: endpoints stay in their slice; new ones fill slices, then new ones."""
        wanted = dict(wanted)
        labels = slice_labels(service)
        by_name: dict[str, JSON] = {}
        unchanged: list[str] = []
        updating: list[str] = []
        deleting: list[str] = []
        for stored in existing:
            name = _meta(stored)["name"]
            by_name[name] = stored
            kept = []
            changed = False
            for endpoint in stored.get("endpoints") or []:
                desired = wanted.pop(endpoint_key(endpoint), None)
                if desired is not None:
                    kept.append(desired)
                    changed |= desired != endpoint
            labels_changed = _visible_labels(_meta(stored).get("labels")) != _visible_labels(labels)
            if changed or len(kept) != len(stored.get("endpoints") or []):
                if not kept:
                    deleting.append(name)
                    continue
                by_name[name] = {**copy.deepcopy(stored), "endpoints": kept}
                by_name[name]["metadata"]["labels"] = dict(labels)
                updating.append(name)
            elif labels_changed:
                by_name[name] = copy.deepcopy(stored)
                by_name[name]["metadata"]["labels"] = dict(labels)
                updating.append(name)
            else:
                unchanged.append(name)
        remaining = list(wanted.values())
        limit = self.max_endpoints_per_slice
        if remaining and updating:  # fill the fullest updated slices first
            for name in sorted(updating, key=lambda n: -len(by_name[n]["endpoints"])):
                room = limit - len(by_name[name]["endpoints"])
                if room > 0:
                    by_name[name]["endpoints"] += remaining[:room]
                    remaining = remaining[room:]
        to_create: list[JSON] = []
        while remaining:
            target: JSON | None = None
            if len(remaining) < limit and unchanged:  # the unchanged slice it fills best
                fits = [
                    n for n in unchanged if len(by_name[n].get("endpoints") or []) + len(remaining) <= limit
                ]
                if fits:
                    best = max(fits, key=lambda n: len(by_name[n].get("endpoints") or []))
                    target = by_name[best] = copy.deepcopy(by_name[best])
                    target["endpoints"] = list(target.get("endpoints") or [])
                    unchanged.remove(best)
                    updating.append(best)
            if target is None:
                target = self._new_slice(service, ports, address_type)
                to_create.append(target)
            room = limit - len(target["endpoints"])
            target["endpoints"] += remaining[:room]
            remaining = remaining[room:]
        return to_create, [by_name[n] for n in updating], [by_name[n] for n in deleting]

    def _finalize(
        self, service: JSON, to_create: list[JSON], to_update: list[JSON], to_delete: list[JSON]
    ) -> None:
        """Creations reuse slices about to be deleted; nothing is created for a Service being deleted."""
        for old in list(to_delete):
            if not to_create:
                break
            if old.get("addressType") == to_create[-1].get("addressType") and owned_by(old, service):
                reused = to_create.pop()
                reused["metadata"] = {
                    **copy.deepcopy(old["metadata"]),
                    "labels": reused["metadata"]["labels"],
                }
                to_update.append(reused)
                to_delete.remove(old)
        slices = self._rspec(SLICES)
        namespace = _meta(service)["namespace"]
        ns_obj = self.emulator.lookup(self._rspec(kmock.resource("", "v1", "namespaces")), None, namespace)
        terminating = bool(_meta(service).get("deletionTimestamp")) or (
            ns_obj is not None and bool(_meta(ns_obj).get("deletionTimestamp"))
        )
        stamp = now()
        if not terminating:
            for body in to_create:
                body["metadata"].setdefault("annotations", {})[TRIGGER_TIME] = stamp
                self.emulator.create_object(slices, _for_api(body), namespace)
        for body in to_update:
            body["metadata"].setdefault("annotations", {})[TRIGGER_TIME] = stamp
            self.emulator.replace_object(slices, namespace, body["metadata"]["name"], _for_api(body))
        for body in to_delete:
            if self.emulator.lookup(slices, namespace, body["metadata"]["name"]) is not None:
                self.emulator.delete_object(slices, namespace, body["metadata"]["name"])


def _for_api(endpoint_slice: JSON) -> JSON:
    """Empty lists as the real API stores them (protobuf has no empty lists): null."""
    body = copy.deepcopy(endpoint_slice)
    body["endpoints"] = body.get("endpoints") or None
    body["ports"] = body.get("ports") or None
    return body
