"""NetworkPolicy (networking.k8s.io/v1) and the pods/namespaces it selects, as frozen values.

Parsed once from API dicts; everything after works on these, so the computation is pure.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from sys import intern
from typing import Any, TypeVar, cast

Labels = Mapping[str, str]
_T = TypeVar("_T")
_SHARED: dict[Any, Any] = {}  # equal values parsed from different objects, kept once


def shared(value: _T) -> _T:
    """One object for every equal ``value`` (label sets, port lists, selectors, rules): an agent
    holds 50k pods whose labels and ports repeat across a Deployment's replicas, and policies whose
    selectors repeat across namespaces. Strings inside go through sys.intern."""
    hit = _SHARED.get(value)
    if hit is None:
        if len(_SHARED) >= 1 << 20:
            _SHARED.clear()  # only sharing is lost
        hit = _SHARED[value] = value
    return cast(_T, hit)


def _labels(data: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    return shared(tuple((intern(k), intern(v)) for k, v in sorted((data or {}).items())))


PROTOCOLS = ("TCP", "UDP", "SCTP")
PortRange = tuple[str, int, int]  # (protocol, first, last); (proto, 0, 65535) = every port
ALL_PORTS = (0, 65535)
LOG_ANNOTATION = "kvswitch.io/log"  # "true" on a NetworkPolicy: its allow and deny decisions are logged


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class Selector:
    """A LabelSelector; all requirements ANDed; no requirement = everything. Hashed once: selectors
    key the memoised selections, looked up for every policy a change touches."""

    requirements: tuple[Requirement, ...] = ()
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(self.requirements))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[Selector], tuple[tuple[Requirement, ...]]]:
        return (Selector, (self.requirements,))  # the hash is per process: never pickled

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None) -> Selector:
        data = data or {}
        reqs = [
            Requirement(intern(k), "In", frozenset({intern(v)})) for k, v in _labels(data.get("matchLabels"))
        ]
        for expr in data.get("matchExpressions") or []:
            op = expr["operator"]
            if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
                raise ValueError(f"unknown selector operator {op!r}")
            values = frozenset(intern(v) for v in expr.get("values") or ())
            reqs.append(Requirement(intern(expr["key"]), intern(op), values))
        return shared(cls(tuple(sorted(set(reqs), key=lambda r: (r.key, r.operator, sorted(r.values))))))

    @property
    def everything(self) -> bool:
        return not self.requirements

    def matches(self, labels: Labels) -> bool:
        return all(r.matches(labels) for r in self.requirements)


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class Peer:
    """podSelector and/or namespaceSelector (ANDed), or an ipBlock. Hashed once (see Selector)."""

    pod_selector: Selector | None = None
    namespace_selector: Selector | None = None
    ip_block: IPBlock | None = None
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.pod_selector, self.namespace_selector, self.ip_block)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[Peer], tuple[Selector | None, Selector | None, IPBlock | None]]:
        return (Peer, (self.pod_selector, self.namespace_selector, self.ip_block))

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Peer:
        if "ipBlock" in data:
            b = data["ipBlock"]
            return shared(cls(ip_block=IPBlock(b["cidr"], tuple(b.get("except") or ()))))
        return shared(
            cls(
                pod_selector=Selector.parse(data["podSelector"]) if "podSelector" in data else None,
                namespace_selector=Selector.parse(data["namespaceSelector"])
                if "namespaceSelector" in data
                else None,
            )
        )


@dataclass(frozen=True, slots=True)
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
        if isinstance(port, str):
            port = int(port) if port.isdigit() else intern(port)
        return shared(cls(intern(protocol), port, data.get("endPort")))


@dataclass(frozen=True, slots=True)
class Rule:
    peers: tuple[Peer, ...] | None  # None: all peers (absent or empty from/to)
    ports: tuple[PortSpec, ...] | None  # None: all ports and protocols
    # Derived once from ports: the numeric port ranges, and whether a port is named.
    numeric: frozenset[PortRange] = field(default=frozenset(), init=False, repr=False, compare=False)
    named: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.ports is not None:
            object.__setattr__(self, "numeric", _numeric_ranges(self.ports))
            object.__setattr__(self, "named", any(isinstance(p.port, str) for p in self.ports))

    @classmethod
    def parse(cls, data: Mapping[str, Any], peer_key: str) -> Rule:
        peers = data.get(peer_key) or []
        ports = data.get("ports") or []
        return shared(
            cls(
                shared(tuple(Peer.parse(p) for p in peers)) if peers else None,
                shared(tuple(PortSpec.parse(p) for p in ports)) if ports else None,
            )
        )


@functools.lru_cache(maxsize=4096)
def _numeric_ranges(ports: tuple[PortSpec, ...]) -> frozenset[PortRange]:
    """The ranges of the numeric ports (and "every port of a protocol"); shared between rules."""
    out: set[PortRange] = set()
    for spec in ports:
        if spec.port is None:
            out.add((spec.protocol, *ALL_PORTS))
        elif isinstance(spec.port, int):
            out.add((spec.protocol, spec.port, spec.end_port or spec.port))
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class Policy:
    namespace: str
    name: str
    pod_selector: Selector
    ingress: tuple[Rule, ...] | None  # None: the policy does not isolate ingress
    egress: tuple[Rule, ...] | None
    log: bool = False  # annotation kvswitch.io/log: "true": its decisions go to the audit log

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
        ingress = shared(tuple(Rule.parse(r, "from") for r in spec.get("ingress") or []))
        egress = shared(tuple(Rule.parse(r, "to") for r in spec.get("egress") or []))
        return cls(
            intern(meta.get("namespace", "default")),
            meta["name"],
            Selector.parse(spec.get("podSelector")),
            ingress if "Ingress" in types else None,
            egress if "Egress" in types else None,
            (meta.get("annotations") or {}).get(LOG_ANNOTATION) == "true",
        )


@dataclass(frozen=True, slots=True)
class ContainerPort:
    name: str
    number: int
    protocol: str


@dataclass(frozen=True, slots=True)
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
        ports = shared(
            tuple(
                shared(
                    ContainerPort(
                        intern(p.get("name", "")), int(p["containerPort"]), intern(p.get("protocol") or "TCP")
                    )
                )
                for c in spec.get("containers") or []
                for p in c.get("ports") or []
            )
        )
        return cls(
            intern(meta.get("namespace", "default")),
            meta["name"],
            _labels(meta.get("labels")),
            status.get("podIP") or None,
            intern(spec.get("nodeName", "")),
            ports,
        )

    def resolve(self, name: str, protocol: str) -> list[int]:
        return sorted({p.number for p in self.ports if p.name == name and p.protocol == protocol})


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    name: str
    labels: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> NamespaceInfo:
        meta = obj["metadata"]
        labels = {**(meta.get("labels") or {}), "kubernetes.io/metadata.name": meta["name"]}
        return cls(intern(meta["name"]), _labels(labels))
