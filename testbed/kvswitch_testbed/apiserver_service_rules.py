"""What kube-apiserver does to a Service before storing it, as pure functions on its ``spec``.

In the real server's order: defaults (``SetDefaults_Service``), then on update the allocated values a
client left out are kept (``patchAllocatedValues``), type-dependent fields the client did not touch are
dropped when the new type does not use them (``dropTypeDependentFields``), clusterIP and clusterIPs are
kept in step (``normalizeClusterIPs``), then validation: the subset of ``ValidateService`` and
``ValidateServiceUpdate`` listed in :func:`validate`. Allocation is in apiserver_services.py.
Field errors are worded and valued as apimachinery renders them (Go syntax for values).
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

import kmock

from kvswitch_testbed.apiserver_schema import Cause
from kvswitch_testbed.apiserver_types import JSON, error

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_TYPES = ("ClusterIP", "ExternalName", "LoadBalancer", "NodePort")
_PROTOCOLS = ("SCTP", "TCP", "UDP")
_POLICIES = ("Cluster", "Local")
FAMILY_POLICIES = ("PreferDualStack", "RequireDualStack", "SingleStack")
FAMILIES = ("IPv4", "IPv6")
_AFFINITY_TIMEOUT = 10800
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_IANA_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_IP_EXAMPLE = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
_PORT_RANGE = "must be between 1 and 65535, inclusive"
_SUBDOMAIN_DETAIL = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
)


def go_value(value: Any) -> str:
    """A value as Go's field errors print it: ``"x"``, ``30080``, ``[]string{"a", "b"}``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        if not value:
            return "[]string(nil)"
        return "[]string{" + ", ".join(go_value(str(v)) for v in value) + "}"
    return str(value)


def _supported(values: tuple[str, ...]) -> str:
    return "supported values: " + ", ".join(f'"{v}"' for v in values)


class Problems(list[Cause]):
    """Field errors, worded as apimachinery's ``field.Error`` renders them."""

    def invalid(self, path: str, value: Any, detail: str) -> None:
        self.append(Cause(path, "FieldValueInvalid", f"Invalid value: {go_value(value)}: {detail}"))

    def required(self, path: str, detail: str = "") -> None:
        self.append(Cause(path, "FieldValueRequired", "Required value" + (f": {detail}" if detail else "")))

    def unsupported(self, path: str, value: Any, supported: tuple[str, ...]) -> None:
        message = f"Unsupported value: {go_value(value)}: {_supported(supported)}"
        self.append(Cause(path, "FieldValueNotSupported", message))

    def forbidden(self, path: str, detail: str) -> None:
        self.append(Cause(path, "FieldValueForbidden", f"Forbidden: {detail}"))

    def duplicate(self, path: str, value: Any) -> None:
        self.append(Cause(path, "FieldValueDuplicate", f"Duplicate value: {value}"))


def internal_error(message: str) -> kmock.KubernetesError:
    return error(500, "InternalError", f"Internal error occurred: {message}", causes=[{"message": message}])


def ports_of(spec: Mapping[str, Any]) -> list[JSON]:
    ports = spec.get("ports")
    return [p for p in ports if isinstance(p, dict)] if isinstance(ports, list) else []


def headless(spec: Mapping[str, Any]) -> bool:
    ips = spec.get("clusterIPs") or []
    return spec.get("clusterIP") == "None" or (isinstance(ips, list) and ips[:1] == ["None"])


def needs_cluster_ip(spec: Mapping[str, Any]) -> bool:
    return spec.get("type") != "ExternalName"


def needs_node_ports(spec: Mapping[str, Any]) -> bool:
    return spec.get("type") in ("NodePort", "LoadBalancer")


def needs_health_check(spec: Mapping[str, Any]) -> bool:
    return spec.get("type") == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local"


def node_port_numbers(spec: Mapping[str, Any]) -> list[int]:
    return [p["nodePort"] for p in ports_of(spec) if isinstance(p.get("nodePort"), int) and p["nodePort"]]


def static_band(size: int, step: int, most: int) -> int:
    """``calculateRangeOffset``: the size of the static band at the start of a range."""
    return 0 if size < 16 else min(max(16, size // step), most)


def family_of(ip: IPAddress) -> str:
    return "IPv4" if ip.version == 4 else "IPv6"


def parse_ip(text: Any) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text) if isinstance(text, str) else None
    except ValueError:
        return None


def set_defaults(spec: JSON) -> None:
    """``SetDefaults_Service`` of the v1 API."""
    if not spec.get("type"):
        spec["type"] = "ClusterIP"
    if not spec.get("sessionAffinity"):
        spec["sessionAffinity"] = "None"
    if spec["sessionAffinity"] == "ClientIP":
        config = spec.get("sessionAffinityConfig")
        client_ip = config.get("clientIP") if isinstance(config, dict) else None
        if not isinstance(client_ip, dict) or client_ip.get("timeoutSeconds") is None:
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": _AFFINITY_TIMEOUT}}
    for port in ports_of(spec):
        if not port.get("protocol"):
            port["protocol"] = "TCP"
        if port.get("targetPort") in (None, 0, ""):
            port["targetPort"] = port.get("port")
    if needs_node_ports(spec) and not spec.get("externalTrafficPolicy"):
        spec["externalTrafficPolicy"] = "Cluster"
    if spec["type"] != "ExternalName" and not spec.get("internalTrafficPolicy"):
        spec["internalTrafficPolicy"] = "Cluster"
    if spec["type"] == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is None:
        spec["allocateLoadBalancerNodePorts"] = True


def keep_allocated(spec: JSON, old: Mapping[str, Any]) -> None:
    """``patchAllocatedValues``: what a client left out of an update keeps its allocated value."""
    if needs_cluster_ip(old) and needs_cluster_ip(spec):
        if not spec.get("clusterIP") and old.get("clusterIP"):
            spec["clusterIP"] = old["clusterIP"]
        if not spec.get("clusterIPs") and old.get("clusterIPs"):
            spec["clusterIPs"] = copy.deepcopy(old["clusterIPs"])
    if needs_node_ports(old) and needs_node_ports(spec):
        used = set(node_port_numbers(old)) & set(node_port_numbers(spec))
        by_name = {p.get("name", ""): p.get("nodePort") for p in ports_of(old)}
        for port in ports_of(spec):
            value = by_name.get(port.get("name", ""))
            if not port.get("nodePort") and value and value not in used:
                port["nodePort"] = value
    if needs_health_check(old) and needs_health_check(spec) and not spec.get("healthCheckNodePort"):
        spec["healthCheckNodePort"] = old.get("healthCheckNodePort")


def normalize_cluster_ips(spec: JSON, old: Mapping[str, Any] | None) -> None:
    """``normalizeClusterIPs``: keep the singular and plural fields in step, as old clients expect."""
    ip, ips = spec.get("clusterIP"), spec.get("clusterIPs")
    if old is None:
        if ip and not ips:
            spec["clusterIPs"] = [ip]
        return
    old_ip, same_ips = old.get("clusterIP"), ips == old.get("clusterIPs")
    if old_ip and not ip and same_ips:
        spec.pop("clusterIPs", None)
    elif old_ip and ip and ip != old_ip and same_ips and isinstance(ips, list) and ips:
        spec["clusterIPs"] = [ip, *ips[1:]]


def drop_type_dependent_fields(spec: JSON, old: Mapping[str, Any]) -> None:
    """``dropTypeDependentFields``: what the new type does not use goes, unless the client changed it."""
    if needs_cluster_ip(old) and not needs_cluster_ip(spec):
        if spec.get("clusterIPs") == old.get("clusterIPs") and spec.get("clusterIP") == old.get("clusterIP"):
            spec.pop("clusterIP", None)
            spec.pop("clusterIPs", None)
        for field in ("ipFamilies", "ipFamilyPolicy"):
            if spec.get(field) == old.get(field):
                spec.pop(field, None)
    unchanged_node_ports = node_port_numbers(spec) == node_port_numbers(old)
    if needs_node_ports(old) and not needs_node_ports(spec) and unchanged_node_ports:
        for port in ports_of(spec):
            port.pop("nodePort", None)
    if (
        needs_health_check(old)
        and not needs_health_check(spec)
        and spec.get("healthCheckNodePort") == old.get("healthCheckNodePort")
    ):
        spec.pop("healthCheckNodePort", None)
    if old.get("type") == "LoadBalancer" and spec.get("type") != "LoadBalancer":
        for field in ("allocateLoadBalancerNodePorts", "loadBalancerClass"):
            if spec.get(field) == old.get(field):
                spec.pop(field, None)
    if (
        needs_node_ports(old)
        and not needs_node_ports(spec)
        and spec.get("externalTrafficPolicy") == old.get("externalTrafficPolicy")
    ):
        spec.pop("externalTrafficPolicy", None)
    if spec.get("type") == "ExternalName" and spec.get("internalTrafficPolicy") == old.get(
        "internalTrafficPolicy"
    ):
        spec.pop("internalTrafficPolicy", None)


def _validate_ports(spec: Mapping[str, Any], problems: Problems) -> None:
    raw = spec.get("ports")
    if raw is not None and not isinstance(raw, list):
        problems.invalid("spec.ports", raw, "must be a list")
        return
    ports = raw or []
    if not ports and not headless(spec) and spec.get("type") != "ExternalName":
        problems.required("spec.ports")
    names: set[str] = set()
    seen: set[tuple[Any, Any]] = set()
    node_ports: set[tuple[Any, Any]] = set()
    for i, port in enumerate(ports):
        path = f"spec.ports[{i}]"
        if not isinstance(port, dict):
            problems.invalid(path, port, "must be an object")
            continue
        name = port.get("name") or ""
        if len(ports) > 1 and not name:
            problems.required(f"{path}.name")
        elif name and not (len(name) <= 63 and _DNS_LABEL.fullmatch(name)):
            detail = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'"
            problems.invalid(f"{path}.name", name, detail)
        elif name in names:
            problems.duplicate(f"{path}.name", go_value(name))
        names.add(name)
        number, protocol = port.get("port"), port.get("protocol")
        if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
            problems.invalid(f"{path}.port", number, _PORT_RANGE)
        if protocol not in _PROTOCOLS:
            problems.unsupported(f"{path}.protocol", protocol, _PROTOCOLS)
        target = port.get("targetPort")
        if isinstance(target, int) and not isinstance(target, bool):
            if not 1 <= target <= 65535:
                problems.invalid(f"{path}.targetPort", target, _PORT_RANGE)
        elif not (isinstance(target, str) and len(target) <= 15 and _IANA_SVC_NAME.fullmatch(target)):
            detail = "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"
            problems.invalid(f"{path}.targetPort", target, detail)
        if (protocol, number) in seen:
            key = (
                f'core.ServicePort{{Name:"", Protocol:"{protocol}", AppProtocol:(*string)(nil), '
                f'Port:{number}, TargetPort:intstr.IntOrString{{Type:0, IntVal:0, StrVal:""}}, NodePort:0}}'
            )
            problems.duplicate(path, key)
        seen.add((protocol, number))
        node_port = port.get("nodePort")
        if node_port:
            if spec.get("type") == "ClusterIP":
                problems.forbidden(f"{path}.nodePort", "may not be used when `type` is 'ClusterIP'")
            elif not isinstance(node_port, int) or not 1 <= node_port <= 65535:
                problems.invalid(f"{path}.nodePort", node_port, _PORT_RANGE)
            elif (protocol, node_port) in node_ports:
                problems.duplicate(f"{path}.nodePort", node_port)
            node_ports.add((protocol, node_port))


def _validate_cluster_ips(spec: Mapping[str, Any], problems: Problems) -> None:
    ip, ips = spec.get("clusterIP") or "", spec.get("clusterIPs") or []
    if spec.get("type") == "ExternalName":
        if ips or ip:
            problems.forbidden("spec.clusterIPs", "may not be set for ExternalName services")
        for field in ("ipFamilies", "ipFamilyPolicy"):
            if spec.get(field):
                problems.forbidden(f"spec.{field}", "may not be set for ExternalName services")
        name = str(spec.get("externalName") or "").removesuffix(".")
        if not name:
            problems.required("spec.externalName")
        elif not (len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name)):
            problems.invalid("spec.externalName", name, _SUBDOMAIN_DETAIL)
            return
        return
    if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
        problems.invalid("spec.clusterIPs", ips, "must be a list of strings")
        return
    if ips and ip != ips[0]:
        problems.invalid("spec.clusterIPs", ips, "first value must match `clusterIP`")
    if len(ips) > 2:
        problems.append(
            Cause("spec.clusterIPs", "FieldValueTooMany", f"Too many: {len(ips)}: must have at most 2 items")
        )
    for i, value in enumerate(ips):
        if value == "None" and i == 0:
            if spec.get("type") in ("NodePort", "LoadBalancer"):
                detail = f"may not be set to 'None' for {spec['type']} services"
                problems.invalid(f"spec.clusterIPs[{i}]", value, detail)
        elif parse_ip(value) is None:
            problems.invalid(f"spec.clusterIPs[{i}]", value, _IP_EXAMPLE)


def _validate_policies(spec: Mapping[str, Any], problems: Problems) -> None:
    affinity = spec.get("sessionAffinity")
    if affinity not in ("ClientIP", "None"):
        problems.unsupported("spec.sessionAffinity", affinity, ("ClientIP", "None"))
    internal = spec.get("internalTrafficPolicy")
    if internal is not None and internal not in _POLICIES:
        problems.unsupported("spec.internalTrafficPolicy", internal, _POLICIES)
    external = spec.get("externalTrafficPolicy")
    accessible = needs_node_ports(spec) or bool(spec.get("externalIPs"))
    if external and not accessible:
        problems.invalid(
            "spec.externalTrafficPolicy", external, "may only be set for externally-accessible services"
        )
    elif external and external not in _POLICIES:
        problems.unsupported("spec.externalTrafficPolicy", external, _POLICIES)
    if spec.get("healthCheckNodePort") and not needs_health_check(spec):
        detail = "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'"
        problems.invalid("spec.healthCheckNodePort", spec["healthCheckNodePort"], detail)


def validate(spec: Mapping[str, Any], old: Mapping[str, Any] | None) -> Problems:
    """The subset of ``ValidateService`` (and ``ValidateServiceUpdate`` with ``old``) emulated here."""
    problems = Problems()
    if spec.get("type") not in _TYPES:
        problems.unsupported("spec.type", spec.get("type"), _TYPES)
        return problems
    _validate_ports(spec, problems)
    _validate_cluster_ips(spec, problems)
    _validate_policies(spec, problems)
    if (
        old is not None
        and needs_cluster_ip(spec)
        and needs_cluster_ip(old)
        and not (headless(old) and headless(spec))
    ):
        before, after = old.get("clusterIPs") or [], spec.get("clusterIPs") or []
        for i, value in enumerate(before[: len(after)]):
            if value != after[i]:
                problems.invalid(f"spec.clusterIPs[{i}]", after, "may not change once set")
        if before and not after:
            problems.invalid("spec.clusterIPs[0]", after, "primary clusterIP can not be unset")
    return problems
