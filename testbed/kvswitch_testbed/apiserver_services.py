"""Services as kube-apiserver's Service storage serves them: defaults, validation, ClusterIP and NodePorts.

On every write of a Service (create, PUT, any PATCH; not its status) the rules of
apiserver_service_rules.py apply (defaults: ``type: ClusterIP``, ``sessionAffinity: None``, ports'
``protocol: TCP`` and ``targetPort`` = ``port``, traffic policies ``Cluster``...; update strategy;
validation), then:

- IP families: ``ipFamilyPolicy: SingleStack`` and the family of ``service_cidr`` (dual-stack requests
  fail as on a single-stack cluster; headless selectorless Services get RequireDualStack, as upstream);
- ClusterIP from ``service_cidr``: a requested one if free and in range; dynamic ones from above the
  static band first and never the first address (the ``kubernetes`` Service's); none for headless
  (``clusterIP: None``) and ExternalName Services; clusterIPs never change once set;
- NodePorts from ``node_port_range`` for NodePort and LoadBalancer Services (one per port number,
  requested ones honoured, none for LoadBalancers with ``allocateLoadBalancerNodePorts: false``),
  a healthCheckNodePort for LoadBalancers with ``externalTrafficPolicy: Local``.

Errors are those of the real server: 422 Invalid with its field paths and Go-rendered values, e.g.
``Service "web" is invalid: spec.clusterIPs: Invalid value: []string{"10.96.0.10"}: failed to allocate
IP 10.96.0.10: provided IP is already allocated``, and 500 InternalError when a range is full.
Allocations are derived from the stored Services: released when a Service is gone (or no longer needs
them), and a dry run reserves nothing.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from kvswitch_testbed.apiserver_crds import Crds
from kvswitch_testbed.apiserver_service_rules import (
    FAMILIES,
    FAMILY_POLICIES,
    Problems,
    drop_type_dependent_fields,
    family_of,
    headless,
    internal_error,
    keep_allocated,
    needs_cluster_ip,
    needs_health_check,
    needs_node_ports,
    node_port_numbers,
    normalize_cluster_ips,
    parse_ip,
    ports_of,
    set_defaults,
    static_band,
    validate,
)
from kvswitch_testbed.apiserver_types import JSON, SERVICES, ResourceSpec, error


def _outside_ports(low: int, high: int) -> str:
    return f"provided port is not in the valid range. The range of valid ports is {low}-{high}"


@attrs.define(kw_only=True)
class Services(Crds):
    """Service admission and allocation; see the module docstring."""

    service_cidr: str = "10.96.0.0/12"
    node_port_range: tuple[int, int] = (30000, 32767)
    kubernetes_service: bool = True  # create default/kubernetes on the first address, as the real server

    # ---------------------------------------------------------------- ranges

    @property
    def service_network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.service_cidr, strict=False)

    def _ip_bounds(self) -> tuple[int, int]:
        """First and last allocatable addresses (as integers): not the network or broadcast address."""
        net = self.service_network
        first, last = int(net.network_address) + 1, int(net.broadcast_address)
        return first, (last - 1 if net.version == 4 else last)

    @property
    def first_service_ip(self) -> str:
        """The address the ``kubernetes`` Service gets, never handed out dynamically."""
        return str(ipaddress.ip_address(self._ip_bounds()[0]))

    def _service_specs(self, except_uid: str | None) -> Iterator[Mapping[str, Any]]:
        for obj in self._live[SERVICES].values():
            if obj["metadata"].get("uid") != except_uid and isinstance(obj.get("spec"), Mapping):
                yield obj["spec"]

    def _taken_ips(self, except_uid: str | None) -> set[str]:
        taken: set[str] = set()
        for spec in self._service_specs(except_uid):
            taken.update(i for i in spec.get("clusterIPs") or [] if i != "None")
        return taken

    def _taken_ports(self, except_uid: str | None) -> set[int]:
        taken: set[int] = set()
        for spec in self._service_specs(except_uid):
            taken.update(node_port_numbers(spec))
            if spec.get("healthCheckNodePort"):
                taken.add(spec["healthCheckNodePort"])
        return taken

    @staticmethod
    def _pick(low: int, high: int, offset: int, taken: set[int]) -> int | None:
        """A free number in [low, high], from above the static band [low, low + offset) first, as
        upstream allocators hand out dynamic values (requested ones come from anywhere)."""
        for start, end in ((low + offset, high), (low, min(high, low + offset - 1))):
            if start > end:
                continue
            for _ in range(64):  # sparse ranges: random probes
                candidate = random.randint(start, end)
                if candidate not in taken:
                    return candidate
            free = [n for n in range(start, end + 1) if n not in taken]
            if free:
                return random.choice(free)
        return None

    # ---------------------------------------------------------------- admission hooks

    def _prepare_create(self, spec: ResourceSpec, obj: JSON) -> None:
        super()._prepare_create(spec, obj)
        if spec.ref == SERVICES:
            self._admit_service(spec, obj, None)

    def _prepare_update(self, spec: ResourceSpec, old: JSON, new: JSON) -> None:
        super()._prepare_update(spec, old, new)
        if spec.ref == SERVICES:
            self._admit_service(spec, new, old)

    def _admit_service(self, rspec: ResourceSpec, obj: JSON, old_obj: JSON | None) -> None:
        name = obj["metadata"]["name"]
        if "spec" not in obj:
            obj["spec"] = {}
        spec = obj["spec"]
        if not isinstance(spec, dict):
            raise error(
                400,
                "BadRequest",
                'Service in version "v1" cannot be handled as a Service: spec must be an object',
            )
        old = old_obj.get("spec") if old_obj is not None else None
        old = old if isinstance(old, dict) else ({} if old_obj is not None else None)
        set_defaults(spec)
        if old is not None:
            keep_allocated(spec, old)
            drop_type_dependent_fields(spec, old)
        normalize_cluster_ips(spec, old)
        problems = validate(spec, old)
        if not problems:
            self._init_ip_families(spec, old, problems)
        if problems:
            self._invalid(rspec, name, problems)
        uid = obj["metadata"].get("uid")
        self._allocate_cluster_ip(rspec, name, spec, old, uid)
        self._allocate_node_ports(rspec, name, spec, old, uid)

    def _init_ip_families(self, spec: JSON, old: Mapping[str, Any] | None, problems: Problems) -> None:
        """``initIPFamilyFields`` on a single-stack cluster of the service CIDR's family."""
        if spec.get("type") == "ExternalName":
            return
        family = family_of(self.service_network.network_address)
        policy = spec.get("ipFamilyPolicy")
        if not policy:
            if old is not None and old.get("ipFamilyPolicy"):
                policy = old["ipFamilyPolicy"]
            elif headless(spec) and not spec.get("selector"):
                policy = "RequireDualStack"
            else:
                policy = "SingleStack"
            spec["ipFamilyPolicy"] = policy
        if policy not in FAMILY_POLICIES:
            problems.unsupported("spec.ipFamilyPolicy", policy, FAMILY_POLICIES)
            return
        families = spec.get("ipFamilies") or []
        if not isinstance(families, list):
            problems.invalid("spec.ipFamilies", families, "must be a list")
            return
        for i, value in enumerate(families):
            if value not in FAMILIES:
                problems.unsupported(f"spec.ipFamilies[{i}]", value, FAMILIES)
        if policy == "SingleStack" and len(families) > 1:
            detail = "must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified"
            problems.invalid("spec.ipFamilyPolicy", policy, detail)
        ips = spec.get("clusterIPs") or []
        for i, value in enumerate(ips):
            parsed = parse_ip(value)
            if parsed is None:
                break
            if i >= len(families):
                if family_of(parsed) != family:
                    problems.invalid(
                        f"spec.clusterIPs[{i}]", ips, f"{family_of(parsed)} is not configured on this cluster"
                    )
                else:
                    families.append(family_of(parsed))
        if problems:
            return
        if headless(spec) and not spec.get("selector"):
            families = families or [family]
            if len(families) < 2 and policy != "SingleStack":
                families.append("IPv6" if families[0] == "IPv4" else "IPv4")
            spec["ipFamilies"] = families
            return
        if policy == "RequireDualStack":
            problems.invalid(
                "spec.ipFamilyPolicy", policy, "this cluster is not configured for dual-stack services"
            )
        for i, value in enumerate(families):
            if value != family:
                problems.invalid(f"spec.ipFamilies[{i}]", value, "not configured on this cluster")
        spec["ipFamilies"] = families or [family]

    # ---------------------------------------------------------------- allocation

    def _allocate_cluster_ip(
        self, rspec: ResourceSpec, name: str, spec: JSON, old: Mapping[str, Any] | None, uid: str | None
    ) -> None:
        if not needs_cluster_ip(spec) or headless(spec):
            return
        if old is not None and needs_cluster_ip(old) and old.get("clusterIPs"):
            return  # allocated at creation; validation kept it unchanged
        ips = spec.get("clusterIPs") or []
        low, high = self._ip_bounds()
        taken = {int(ipaddress.ip_address(i)) for i in self._taken_ips(uid) if parse_ip(i) is not None}
        if ips:
            wanted = parse_ip(ips[0])
            assert wanted is not None  # validated
            if wanted.version != self.service_network.version or not low <= int(wanted) <= high:
                problem = (
                    f"the provided IP ({wanted}) is not in the valid range. "
                    f"The range of valid IPs is {self.service_network}"
                )
            elif int(wanted) in taken:
                problem = "provided IP is already allocated"
            else:
                spec["clusterIP"], spec["clusterIPs"] = str(wanted), [str(wanted), *ips[1:]]
                return
            causes = Problems()
            causes.invalid("spec.clusterIPs", ips, f"failed to allocate IP {ips[0]}: {problem}")
            self._invalid(rspec, name, causes)
        offset = static_band(high - low + 1, 16, 256)
        picked = self._pick(low + 1, high, max(0, offset - 1), taken)  # the first address is reserved
        if picked is None:
            raise internal_error("failed to allocate a serviceIP: range is full")
        spec["clusterIP"] = str(ipaddress.ip_address(picked))
        spec["clusterIPs"] = [spec["clusterIP"]]

    def _check_port(self, rspec: ResourceSpec, name: str, path: str, port: int, taken: set[int]) -> None:
        low, high = self.node_port_range
        if not low <= port <= high:
            problem = _outside_ports(low, high)
        elif port in taken:
            problem = "provided port is already allocated"
        else:
            return
        causes = Problems()
        causes.invalid(path, port, problem)
        self._invalid(rspec, name, causes)

    def _next_port(self, taken: set[int], what: str = "a nodePort") -> int:
        low, high = self.node_port_range
        picked = self._pick(low, high, static_band(high - low + 1, 32, 128), taken)
        if picked is None:
            raise internal_error(f"failed to allocate {what}: range is full")
        return picked

    def _allocate_node_ports(
        self, rspec: ResourceSpec, name: str, spec: JSON, old: Mapping[str, Any] | None, uid: str | None
    ) -> None:
        taken = self._taken_ports(uid)
        mine = set(node_port_numbers(old)) if old is not None and needs_node_ports(old) else set()
        if needs_node_ports(spec):
            allocate = spec["type"] == "NodePort" or spec.get("allocateLoadBalancerNodePorts") is not False
            ports = ports_of(spec)
            by_number: dict[Any, int] = {}
            for port in ports:  # a requested nodePort serves every entry of its port number (TCP and UDP)
                if port.get("nodePort"):
                    by_number.setdefault(port.get("port"), port["nodePort"])
            used: set[int] = set()
            for i, port in enumerate(ports):
                wanted = port.get("nodePort") or 0
                if not wanted and not allocate:
                    continue
                if not wanted and port.get("port") in by_number:
                    wanted = port["nodePort"] = by_number[port.get("port")]
                if wanted:
                    if wanted not in mine and wanted not in used:
                        self._check_port(rspec, name, f"spec.ports[{i}].nodePort", wanted, taken)
                else:
                    wanted = port["nodePort"] = self._next_port(taken | used | mine)
                    by_number[port.get("port")] = wanted
                used.add(wanted)
            taken |= used
        if needs_health_check(spec):
            wanted = spec.get("healthCheckNodePort") or 0
            before = old.get("healthCheckNodePort") if old is not None and needs_health_check(old) else None
            if before and wanted != before:
                causes = Problems()
                detail = (
                    "cannot change healthCheckNodePort on loadBalancer service "
                    "with externalTraffic=Local during update"
                )
                causes.invalid("spec.healthCheckNodePort", wanted, detail)
                self._invalid(rspec, name, causes)
            if not wanted:
                spec["healthCheckNodePort"] = self._next_port(taken | mine, "a HealthCheck NodePort")
            elif wanted != before:
                low, high = self.node_port_range
                if not low <= wanted <= high or wanted in taken:
                    problem = "provided port is already allocated"
                    if not low <= wanted <= high:
                        problem = _outside_ports(low, high)
                    raise internal_error(
                        f"failed to allocate requested HealthCheck NodePort {wanted}: {problem}"
                    )

    # ---------------------------------------------------------------- the kubernetes Service

    def _create_kubernetes_service(self) -> None:
        """default/kubernetes, as the real server keeps it (its endpoints are not published here)."""
        body = {
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {"component": "apiserver", "provider": "kubernetes"},
            },
            "spec": {
                "clusterIP": self.first_service_ip,
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}],
            },
        }
        self.create_object(self._spec_for(SERVICES), body)
