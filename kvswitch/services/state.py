"""The agent's view of Services and EndpointSlices, updated per event; says which Services changed.

Pure (no I/O). A Service that cannot be translated keeps its last good translation, so a bad edit
never disturbs traffic; the caller reports it (a warning Event).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from kvswitch.ovs.flows import Flow
from kvswitch.ovs.groups import Group
from kvswitch.ovs.pipeline import NODEPORT_VIP
from kvswitch.services.flows import NodeContext, service_flows
from kvswitch.services.health import HealthCheck
from kvswitch.services.model import (
    Endpoint,
    ServiceInfo,
    SliceInfo,
    parse_service,
    parse_slice,
    select_endpoints,
)


class GroupIds:
    """Stable group ids: a Service port keeps its id while it exists; freed ids are reused."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._free: list[int] = []
        self._next = 1

    def __call__(self, key: str) -> int:
        gid = self._ids.get(key)
        if gid is None:
            gid = self._free.pop() if self._free else self._next
            if gid == self._next:
                self._next += 1
            self._ids[key] = gid
        return gid

    def release_prefix(self, prefix: str) -> None:
        for key in [k for k in self._ids if k.startswith(prefix)]:
            self._free.append(self._ids.pop(key))


class ServiceState:
    def __init__(self, node: NodeContext) -> None:
        self.node = node
        self.services: dict[str, ServiceInfo] = {}
        self.slices: dict[str, SliceInfo] = {}  # by namespace/slice name
        self._by_service: dict[str, set[str]] = defaultdict(set)  # service key -> slice keys
        self.group_ids = GroupIds()
        self.errors: dict[str, str] = {}  # service key -> why its last version was not translated

    def set_node(self, node: NodeContext) -> set[str]:
        """The node's addresses changed (NodePorts follow them): every Service is affected."""
        if node == self.node:
            return set()
        self.node = node
        return set(self.services)

    def set_service(self, key: str, obj: dict[str, Any] | None) -> set[str]:
        """Returns the Service keys whose flows must be recomputed. Raises UntranslatableService
        (after recording it) for a Service that cannot be programmed; its old flows stay."""
        if obj is None:
            self.errors.pop(key, None)
            return {key} if self.services.pop(key, None) is not None else set()
        try:
            info = parse_service(obj)
        except ValueError as exc:
            self.errors[key] = str(exc)
            raise
        self.errors.pop(key, None)
        if self.services.get(key) == info:
            return set()
        self.services[key] = info
        return {key}

    def set_slice(self, key: str, obj: dict[str, Any] | None) -> set[str]:
        old = self.slices.pop(key, None)
        touched: set[str] = set()
        if old is not None:
            self._by_service[old.service_key].discard(key)
            touched.add(old.service_key)
        new = parse_slice(obj) if obj is not None else None
        if new is not None:
            self.slices[key] = new
            self._by_service[new.service_key].add(key)
            touched.add(new.service_key)
        if old == new:
            return set()
        return touched

    def endpoints(self, service_key: str) -> list[tuple[str, str, Endpoint]]:
        return [e for s in sorted(self._by_service.get(service_key, ())) for e in self.slices[s].endpoints]

    def node_ports(self) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
        """(protocol, NodePort) of every Service: those with externalTrafficPolicy Cluster, Local."""
        cluster: set[tuple[str, int]] = set()
        local: set[tuple[str, int]] = set()
        for svc in self.services.values():
            for port in svc.ports:
                if port.node_port is not None:
                    (local if svc.external_local else cluster).add((port.protocol, port.node_port))
        return cluster, local

    def udp_backends(self, key: str) -> set[tuple[str, int, str, int]]:
        """(frontend ip, port, endpoint ip, port) of every UDP path this node programs for the Service."""
        svc = self.services.get(key)
        if svc is None:
            return set()
        eps = self.endpoints(key)
        out: set[tuple[str, int, str, int]] = set()
        for port in svc.ports:
            if port.protocol != "UDP":
                continue
            candidates = [e for name, proto, e in eps if name == port.name and proto == "UDP"]
            internal = select_endpoints(candidates, self.node.name, svc.internal_local)
            external = select_endpoints(candidates, self.node.name, svc.external_local)
            fronts = [(ip, port.port, internal) for ip in svc.cluster_ips]
            fronts += [(ip, port.port, external) for ip in svc.external_ips]
            if port.node_port is not None:
                fronts += [(ip, port.node_port, external) for ip in (*self.node.addresses, NODEPORT_VIP)]
            out |= {(ip, p, e.ip, e.port) for ip, p, selected in fronts for e in selected}
        return out

    def health_checks(self) -> dict[int, HealthCheck]:
        """healthCheckNodePort → the Service and how many of its endpoints serve on this node."""
        out: dict[int, HealthCheck] = {}
        for key, svc in self.services.items():
            if svc.health_check_node_port is None or not svc.external_local:
                continue
            candidates = [e for _, _, e in self.endpoints(key)]
            local = {e.ip for e in select_endpoints(candidates, self.node.name, True)}
            out[svc.health_check_node_port] = HealthCheck(svc.namespace, svc.name, len(local))
        return out

    def translate(self, key: str) -> tuple[list[Flow], list[Group]]:
        """The flows and groups of one Service on this node (nothing when it is gone)."""
        svc = self.services.get(key)
        if svc is None:
            self.group_ids.release_prefix(key + "/")
            return [], []
        return service_flows(svc, self.endpoints(key), self.node, self.group_ids)
