"""Services and EndpointSlices as the service proxy needs them, parsed once from API objects.

Pure data (no I/O): :func:`parse_service` and :func:`parse_slice` take the API's JSON and either
return a frozen model or raise :class:`UntranslatableService` saying which field is the problem.
:func:`select_endpoints` applies kube-proxy's rules for which endpoints a connection may use.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

PROTOCOLS = ("TCP", "UDP", "SCTP")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MAX_AFFINITY_TIMEOUT = 86400  # the API's maximum for sessionAffinityConfig.clientIP.timeoutSeconds


class UntranslatableService(ValueError):
    """The Service cannot be programmed; the message names the field."""


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    protocol: str  # TCP, UDP or SCTP
    port: int
    node_port: int | None = None


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]  # empty for headless / ExternalName
    ports: tuple[ServicePort, ...]
    external_ips: tuple[str, ...] = ()  # spec.externalIPs and status.loadBalancer.ingress[].ip
    affinity_timeout: int | None = None  # seconds, when sessionAffinity is ClientIP
    external_local: bool = False  # externalTrafficPolicy: Local
    internal_local: bool = False  # internalTrafficPolicy: Local
    health_check_node_port: int | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str
    port: int
    node: str | None = None
    ready: bool = True
    serving: bool = True
    terminating: bool = False


@dataclass(frozen=True, slots=True)
class SliceInfo:
    """One EndpointSlice: for each port name, the endpoints with that slice's port number."""

    namespace: str
    name: str
    service: str  # the owning Service's name (label kubernetes.io/service-name)
    endpoints: tuple[tuple[str, str, Endpoint], ...]  # (port name, protocol, endpoint)

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.service}"


def _ipv4(value: Any, field: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise UntranslatableService(f"{field}: {value!r} is not an IPv4 address") from None


def _port(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise UntranslatableService(f"{field}: {value!r} is not a port number")
    return value


def parse_service(obj: dict[str, Any]) -> ServiceInfo:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    status = obj.get("status") or {}
    namespace, name = meta.get("namespace", ""), meta["name"]
    kind = spec.get("type") or "ClusterIP"
    if kind not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise UntranslatableService(f"spec.type: unsupported value {kind!r}")
    if kind == "ExternalName":
        return ServiceInfo(namespace, name, (), ())
    raw_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    cluster_ips: list[str] = []
    for i, ip in enumerate(raw_ips):
        if ip == "None":
            continue
        if ":" in str(ip):
            continue  # IPv6 family of a dual-stack Service: not handled by this IPv4 datapath
        cluster_ips.append(_ipv4(ip, f"spec.clusterIPs[{i}]"))
    ports: list[ServicePort] = []
    seen: set[tuple[str, int]] = set()
    for i, p in enumerate(spec.get("ports") or []):
        protocol = p.get("protocol") or "TCP"
        if protocol not in PROTOCOLS:
            raise UntranslatableService(f"spec.ports[{i}].protocol: unsupported value {protocol!r}")
        port = _port(p.get("port"), f"spec.ports[{i}].port")
        if (protocol, port) in seen:
            raise UntranslatableService(f"spec.ports[{i}]: duplicate {protocol} port {port}")
        seen.add((protocol, port))
        node_port = p.get("nodePort")
        if kind == "ClusterIP":
            node_port = None
        elif node_port is not None:
            node_port = _port(node_port, f"spec.ports[{i}].nodePort")
        ports.append(ServicePort(p.get("name") or "", protocol, port, node_port))
    external = [_ipv4(ip, f"spec.externalIPs[{i}]") for i, ip in enumerate(spec.get("externalIPs") or [])]
    for i, ing in enumerate((status.get("loadBalancer") or {}).get("ingress") or []):
        if ing.get("ip") and ":" not in ing["ip"]:
            external.append(_ipv4(ing["ip"], f"status.loadBalancer.ingress[{i}].ip"))
    affinity = spec.get("sessionAffinity") or "None"
    timeout: int | None = None
    if affinity == "ClientIP":
        cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds")
        timeout = 10800 if cfg is None else cfg
        if not isinstance(timeout, int) or not 0 < timeout <= MAX_AFFINITY_TIMEOUT:
            raise UntranslatableService(f"spec.sessionAffinityConfig.clientIP.timeoutSeconds: {cfg!r}")
    elif affinity != "None":
        raise UntranslatableService(f"spec.sessionAffinity: unsupported value {affinity!r}")
    etp, itp = spec.get("externalTrafficPolicy") or "Cluster", spec.get("internalTrafficPolicy") or "Cluster"
    if etp not in ("Cluster", "Local"):
        raise UntranslatableService(f"spec.externalTrafficPolicy: unsupported value {etp!r}")
    if itp not in ("Cluster", "Local"):
        raise UntranslatableService(f"spec.internalTrafficPolicy: unsupported value {itp!r}")
    hc = spec.get("healthCheckNodePort")
    return ServiceInfo(
        namespace=namespace,
        name=name,
        cluster_ips=tuple(cluster_ips),
        ports=tuple(ports),
        external_ips=tuple(dict.fromkeys(external)),
        affinity_timeout=timeout,
        external_local=etp == "Local" and kind in ("NodePort", "LoadBalancer"),
        internal_local=itp == "Local",
        health_check_node_port=_port(hc, "spec.healthCheckNodePort") if hc is not None else None,
    )


def parse_slice(obj: dict[str, Any]) -> SliceInfo | None:
    """None for slices the proxy ignores (not IPv4, no owning Service label)."""
    meta = obj.get("metadata") or {}
    service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not service or obj.get("addressType", "IPv4") != "IPv4":
        return None
    ports = [
        (p.get("name") or "", p.get("protocol") or "TCP", p.get("port"))
        for p in obj.get("ports") or []
        if isinstance(p.get("port"), int)
    ]
    endpoints: list[tuple[str, str, Endpoint]] = []
    for ep in obj.get("endpoints") or []:
        cond = ep.get("conditions") or {}
        ready = cond.get("ready") is not False  # nil means ready
        serving = cond.get("serving") if cond.get("serving") is not None else ready
        terminating = bool(cond.get("terminating"))
        for address in ep.get("addresses") or []:
            try:
                ip = str(ipaddress.IPv4Address(address))
            except ValueError:
                continue
            for port_name, protocol, number in ports:
                endpoint = Endpoint(ip, number, ep.get("nodeName"), ready, bool(serving), terminating)
                endpoints.append((port_name, protocol, endpoint))
    return SliceInfo(meta.get("namespace", ""), meta["name"], service, tuple(endpoints))


def select_endpoints(candidates: list[Endpoint], node: str, local_only: bool) -> list[Endpoint]:
    """kube-proxy's choice: ready endpoints; when there are none, the serving terminating ones.
    ``local_only`` (a Local traffic policy) keeps only endpoints on ``node``."""
    if local_only:
        candidates = [e for e in candidates if e.node == node]
    ready = [e for e in candidates if e.ready and not e.terminating]
    if ready:
        return sorted(set(ready), key=_order)
    return sorted({e for e in candidates if e.serving and e.terminating}, key=_order)


def _order(e: Endpoint) -> tuple[bytes, int]:
    # numeric address order: 4 network-order bytes compare as the number (ipaddress costs ~10x)
    return socket.inet_aton(e.ip), e.port
