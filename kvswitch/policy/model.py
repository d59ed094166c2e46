"""NetworkPolicy (networking.k8s.io/v1) and the pods/namespaces it selects, as frozen values.

Parsed once from API dicts; everything after works on these, so the computation is pure.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Labels = Mapping[str, str]
PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: frozenset[str] = frozenset()

    def matches(self, labels: Labels) -> bool:
        has = self.key in labels
        if self.operator == "In":
            return has and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not has or labels[self.key] not in self.values
        if self.operator == "Exists":
            return has
        if self.operator == "DoesNotExist":
            return not has
        raise ValueError(f"unknown selector operator {self.operator!r}")


@dataclass(frozen=True)
class Selector:
    """A LabelSelector; all requirements ANDed; no requirement = everything."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None) -> Selector:
        data = data or {}
        reqs = [
            Requirement(k, "In", frozenset({v})) for k, v in sorted((data.get("matchLabels") or {}).items())
        ]
        for expr in data.get("matchExpressions") or []:
            op = expr["operator"]
            if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
                raise ValueError(f"unknown selector operator {op!r}")
            reqs.append(Requirement(expr["key"], op, frozenset(expr.get("values") or ())))
        return cls(tuple(sorted(set(reqs), key=lambda r: (r.key, r.operator, sorted(r.values)))))

    @property
    def everything(self) -> bool:
        return not self.requirements

    def matches(self, labels: Labels) -> bool:
        return all(r.matches(labels) for r in self.requirements)


@dataclass(frozen=True)
class IPBlock:
    cidr: str
    excepts: tuple[str, ...] = ()

    def networks(self) -> list[ipaddress.IPv4Network]:
        """The CIDR minus its exceptions, as disjoint networks."""
        nets = [ipaddress.IPv4Network(self.cidr, strict=False)]
        for ex in self.excepts:
            hole = ipaddress.IPv4Network(ex, strict=False)
            nxt: list[ipaddress.IPv4Network] = []
            for n in nets:
                if hole.subnet_of(n):
                    nxt.extend(n.address_exclude(hole))
                elif not n.subnet_of(hole):
                    nxt.append(n)
            nets = nxt
        return sorted(nets)


@dataclass(frozen=True)
class Peer:
    """podSelector and/or namespaceSelector (ANDed), or an ipBlock."""

    pod_selector: Selector | None = None
    namespace_selector: Selector | None = None
    ip_block: IPBlock | None = None

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Peer:
        if "ipBlock" in data:
            b = data["ipBlock"]
            return cls(ip_block=IPBlock(b["cidr"], tuple(b.get("except") or ())))
        return cls(
            pod_selector=Selector.parse(data["podSelector"]) if "podSelector" in data else None,
            namespace_selector=Selector.parse(data["namespaceSelector"])
            if "namespaceSelector" in data
            else None,
        )


@dataclass(frozen=True)
class PortSpec:
    protocol: str = "TCP"
    port: int | str | None = None  # None: every port of the protocol; str: a named container port
    end_port: int | None = None

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> PortSpec:
        protocol = data.get("protocol") or "TCP"
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}")
        port = data.get("port")
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        return cls(protocol, port, data.get("endPort"))


@dataclass(frozen=True)
class Rule:
    peers: tuple[Peer, ...] | None  # None: all peers (absent or empty from/to)
    ports: tuple[PortSpec, ...] | None  # None: all ports and protocols

    @classmethod
    def parse(cls, data: Mapping[str, Any], peer_key: str) -> Rule:
        peers = data.get(peer_key) or []
        ports = data.get("ports") or []
        return cls(
            tuple(Peer.parse(p) for p in peers) if peers else None,
            tuple(PortSpec.parse(p) for p in ports) if ports else None,
        )


@dataclass(frozen=True)
class Policy:
    namespace: str
    name: str
    pod_selector: Selector
    ingress: tuple[Rule, ...] | None  # None: the policy does not isolate ingress
    egress: tuple[Rule, ...] | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> Policy:
        meta, spec = obj["metadata"], obj.get("spec") or {}
        types = spec.get("policyTypes")
        if not types:
            # Inferred: always Ingress; Egress when the policy has egress rules.
            types = ["Ingress"] + (["Egress"] if spec.get("egress") else [])
        ingress = tuple(Rule.parse(r, "from") for r in spec.get("ingress") or [])
        egress = tuple(Rule.parse(r, "to") for r in spec.get("egress") or [])
        return cls(
            meta.get("namespace", "default"),
            meta["name"],
            Selector.parse(spec.get("podSelector")),
            ingress if "Ingress" in types else None,
            egress if "Egress" in types else None,
        )


@dataclass(frozen=True)
class ContainerPort:
    name: str
    number: int
    protocol: str


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...]
    ip: str | None
    node: str
    ports: tuple[ContainerPort, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> PodInfo:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        ports = tuple(
            ContainerPort(p.get("name", ""), int(p["containerPort"]), p.get("protocol") or "TCP")
            for c in spec.get("containers") or []
            for p in c.get("ports") or []
        )
        return cls(
            meta.get("namespace", "default"),
            meta["name"],
            tuple(sorted((meta.get("labels") or {}).items())),
            status.get("podIP") or None,
            spec.get("nodeName", ""),
            ports,
        )

    def resolve(self, name: str, protocol: str) -> list[int]:
        return sorted({p.number for p in self.ports if p.name == name and p.protocol == protocol})


@dataclass(frozen=True)
class NamespaceInfo:
    name: str
    labels: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> NamespaceInfo:
        meta = obj["metadata"]
        labels = {**(meta.get("labels") or {}), "kubernetes.io/metadata.name": meta["name"]}
        return cls(meta["name"], tuple(sorted(labels.items())))
