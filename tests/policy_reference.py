"""Reference evaluator for Kubernetes NetworkPolicy (networking.k8s.io/v1) and a seeded case generator.

Written from the Kubernetes documentation only (no datapath code was read), so that the OVS datapath
can be checked against an independent model. Every rule below cites where it comes from:

[NP]   Concept page "Network Policies",
       https://kubernetes.io/docs/concepts/services-networking/network-policies/
[API]  NetworkPolicy API reference (NetworkPolicySpec, NetworkPolicyIngressRule/EgressRule,
       NetworkPolicyPeer, NetworkPolicyPort, IPBlock),
       https://kubernetes.io/docs/reference/kubernetes-api/policy-resources/network-policy-v1/
[LS]   LabelSelector API reference,
       https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/label-selector/
[LBL]  Concept page "Labels and Selectors",
       https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/
[POD]  Pod API reference, ContainerPort,
       https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#ports

Objects are plain dicts shaped exactly like the API returns them (``metadata``/``spec``/``status``),
so the same objects can be fed to the code under test.

Usage::

    cluster = make_cluster(7)                      # namespaces, pods (no IPs yet), policies
    assign_ips(cluster, lambda pod: ipam(pod))     # or a {"ns/name": ip} mapping
    cases = make_cases(cluster, 7, n=200)          # [(src, dst, proto, port, expected), ...]
    assert allowed(cluster, *cases[0][:4]) == cases[0].expected

or in one go: ``cluster, cases = generate(7, assign_ip=...)``.  ``evaluate`` returns the verdict with
the reason for each direction, ``describe`` renders a case for a failure message.

Choices where the documentation leaves room (each is repeated at the code implementing it):

* Inferred ``policyTypes`` with ``egress: []``: [API] says the default is "based on the existence of
  Ingress or Egress rules; policies that contain an Egress section are assumed to affect Egress" and
  that a policy meant to allow no egress "must specify a policyTypes value that include 'Egress'
  (since such a policy would not include an Egress section and would otherwise default to just
  [ 'Ingress' ])"; [NP]: "``Egress`` will be set if the NetworkPolicy has any egress rules".
  An empty list has no egress rules, so ``egress: []`` without ``policyTypes`` is Ingress-only and
  does not isolate anything for egress. ``policyTypes: []`` counts as "not specified".
* ``policyTypes`` given explicitly wins: the sections of a direction it does not list are ignored
  ([NP]: "The ``policyTypes`` field indicates whether or not the given policy applies to ingress
  traffic to selected pod, egress traffic from selected pods, or both").
* ``ipBlock`` is purely address based and matches pod and node addresses too. [NP] only advises that
  blocks "should be cluster-external IPs, since Pod IPs are ephemeral and unpredictable"; [API]
  defines an IPBlock as "a particular CIDR ... that is allowed", with nothing exempting pod IPs.
* The node exemption covers exactly the pod's own node: [NP] "When a pod is isolated for ingress,
  the only allowed connections into the pod are those from the pod's node and those allowed by the
  ``ingress`` list" and "traffic to and from the node where a Pod is running is always allowed,
  regardless of the IP address of the Pod or the node". So node -> own pod and pod -> own node are
  always allowed; another node's address is an ordinary IP, subject to ``ipBlock`` rules. A node is
  known by the one address in ``Cluster.node_ips``.
* A pod talking to itself (src == dst == pod IP) is always allowed: [NP] "a pod cannot block access
  to itself". The generator produces no such cases (the kernel never puts them on the wire).
* Named ports are resolved against the destination pod of the connection, in both directions
  ([API] port: "This can either be a numerical or named port on a pod"); a container port matches
  when its name, its protocol (the rule's protocol, default TCP) and its number all match. When the
  destination is not a pod a named port matches nothing.
* Only connections are judged (the first packet); [NP]: "Reply traffic for those allowed connections
  will also be implicitly allowed". ``hostNetwork`` pods, Services and SNAT are out of scope.
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "ALL_FEATURES",
    "DEFAULT_EXTERNAL",
    "DEFAULT_NODE_IPS",
    "DEFAULT_POD_CIDR",
    "PROTOCOLS",
    "Case",
    "Cluster",
    "Verdict",
    "allowed",
    "assign_ips",
    "case_kind",
    "describe",
    "evaluate",
    "feature_census",
    "generate",
    "host_local_allocator",
    "make_cases",
    "make_cluster",
    "pod_ip",
    "pod_key",
    "policy_types",
    "selector_matches",
    "validate_cluster",
    "validate_policy",
]

Obj = dict[str, Any]

PROTOCOLS = ("TCP", "UDP", "SCTP")
DEFAULT_POD_CIDR = "10.244.0.0/16"
DEFAULT_NODE_IPS: dict[str, str] = {"node1": "10.250.0.11", "node2": "10.250.0.12", "node3": "10.250.0.13"}
DEFAULT_EXTERNAL: tuple[str, ...] = tuple(f"10.250.0.{i}" for i in range(200, 211))
DEFAULT_NAMESPACES = ("ns-a", "ns-b", "ns-c")
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
INGRESS, EGRESS = "Ingress", "Egress"


# --- the model ----------------------------------------------------------------------------------


@dataclass
class Cluster:
    """The inputs of the evaluator: API objects as dicts plus the addresses that are not API objects.

    ``node_ips`` maps a node name (``pod.spec.nodeName``) to the node's own address; ``external``
    lists hosts outside the cluster. ``pod_cidr``/``node_pod_cidrs`` are informational (the
    generator draws ``ipBlock`` CIDRs from them; :func:`host_local_allocator` allocates in them).
    """

    namespaces: list[Obj]
    pods: list[Obj]
    policies: list[Obj]
    node_ips: dict[str, str]
    external: list[str] = field(default_factory=list)
    pod_cidr: str = DEFAULT_POD_CIDR
    node_pod_cidrs: dict[str, str] = field(default_factory=dict)

    def pod_by_ip(self, ip: str) -> Obj | None:
        for pod in self.pods:
            if pod_ip(pod) == ip:
                return pod
        return None

    def namespace_labels(self, name: str) -> dict[str, str]:
        for ns in self.namespaces:
            if ns["metadata"]["name"] == name:
                return dict(ns["metadata"].get("labels") or {})
        raise ValueError(f"pod namespace {name!r} is not in cluster.namespaces")

    def node_of_ip(self, ip: str) -> str | None:
        return next((node for node, addr in self.node_ips.items() if addr == ip), None)


class Case(NamedTuple):
    """One connection to try, and whether the reference says it must succeed."""

    src_ip: str
    dst_ip: str
    protocol: str
    port: int
    expected: bool


@dataclass(frozen=True)
class Verdict:
    """The decision and, per direction, why (for failure messages)."""

    allowed: bool
    egress: str
    ingress: str


def pod_ip(pod: Mapping[str, Any]) -> str | None:
    ip = (pod.get("status") or {}).get("podIP")
    return str(ip) if ip else None


def pod_key(pod: Mapping[str, Any]) -> str:
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def _labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict(obj["metadata"].get("labels") or {})


def _policy_key(policy: Mapping[str, Any]) -> str:
    return f"{policy['metadata']['namespace']}/{policy['metadata']['name']}"


# --- label selectors ----------------------------------------------------------------------------


def requirement_matches(req: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """One ``matchExpressions`` element.

    [LS] "Valid operators are In, NotIn, Exists and DoesNotExist." Meaning per [LBL]: ``in`` selects
    resources "with key equal to ``environment`` and value equal to ``production`` or ``qa``";
    ``notin`` selects those "with key equal to ``tier`` and values other than ``frontend`` and
    ``backend``, and all resources with no labels with the ``tier`` key"; exists "selects all
    resources including a label with key ``partition``; no values are checked"; ``!partition``
    "selects all resources without a label with key ``partition``".
    """
    key, op, values = req["key"], req["operator"], list(req.get("values") or [])
    present = key in labels
    if op == "In":
        return present and labels[key] in values
    if op == "NotIn":
        return not present or labels[key] not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    raise ValueError(f"unknown label selector operator {op!r}")


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """[LS] "The result of matchLabels and matchExpressions are ANDed. An empty label selector
    matches all objects. A null label selector matches no objects." A ``matchLabels`` pair "is
    equivalent to an element of matchExpressions, whose key field is "key", the operator is "In",
    and the values array contains only "value". The requirements are ANDed."
    """
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    return all(requirement_matches(req, labels) for req in selector.get("matchExpressions") or [])


# --- policy semantics ---------------------------------------------------------------------------


def policy_types(policy: Mapping[str, Any]) -> frozenset[str]:
    """The directions a policy applies to.

    [API] policyTypes: "If this field is not specified, it will default based on the existence of
    Ingress or Egress rules; policies that contain an Egress section are assumed to affect Egress,
    and all policies (whether or not they contain an Ingress section) are assumed to affect
    Ingress." and "if you want to write a policy that specifies that no egress is allowed, you must
    specify a policyTypes value that include "Egress" (since such a policy would not include an
    Egress section and would otherwise default to just [ "Ingress" ])". [NP]: "``Egress`` will be
    set if the NetworkPolicy has any egress rules."

    Choice: ``egress: []`` has no egress rules, so it does not add Egress; an empty
    ``policyTypes: []`` is treated as not specified.
    """
    spec = policy.get("spec") or {}
    explicit = spec.get("policyTypes")
    if explicit:
        return frozenset(explicit)
    return frozenset({INGRESS, EGRESS}) if spec.get("egress") else frozenset({INGRESS})


def policy_selects(policy: Mapping[str, Any], pod: Mapping[str, Any]) -> bool:
    """[API] podSelector "Selects the pods to which this NetworkPolicy object applies ... An empty
    podSelector matches all pods in this namespace." Only pods of the policy's own namespace."""
    if policy["metadata"]["namespace"] != pod["metadata"]["namespace"]:
        return False
    return selector_matches((policy.get("spec") or {}).get("podSelector"), _labels(pod))


def applicable_policies(cluster: Cluster, pod: Mapping[str, Any], direction: str) -> list[Obj]:
    """[NP] "A pod is isolated for egress if there is any NetworkPolicy that both selects the pod and
    has "Egress" in its ``policyTypes``; we say that such a policy applies to the pod for egress."
    (and the same for ingress)."""
    return [p for p in cluster.policies if direction in policy_types(p) and policy_selects(p, pod)]


def ipblock_matches(block: Mapping[str, Any], ip: str) -> bool:
    """[API] IPBlock "describes a particular CIDR ... that is allowed to the pods matched by a
    NetworkPolicySpec's podSelector. The except entry describes CIDRs that should not be included
    within this rule." Address based only, so pod and node addresses match too (see module doc).
    The API's own examples ("192.168.1.1/24") have host bits set, hence ``strict=False``."""
    addr = ipaddress.ip_address(ip)
    if addr not in ipaddress.ip_network(block["cidr"], strict=False):
        return False
    return not any(addr in ipaddress.ip_network(e, strict=False) for e in block.get("except") or [])


def peer_matches(cluster: Cluster, policy: Mapping[str, Any], peer: Mapping[str, Any], ip: str) -> bool:
    """One ``from``/``to`` element against the other end's address.

    [API] ipBlock: "If this field is set then neither of the other fields can be."
    namespaceSelector: "Selects Namespaces using cluster-scoped labels ... if present but empty, it
    selects all namespaces. If PodSelector is also set, then the NetworkPolicyPeer as a whole
    selects the Pods matching PodSelector in the Namespaces selected by NamespaceSelector.
    Otherwise it selects all Pods in the Namespaces selected by NamespaceSelector."
    podSelector: "if present but empty, it selects all pods. ... Otherwise it selects the Pods
    matching PodSelector in the policy's own Namespace."
    Selectors select pods only: a node or external address never matches them.
    """
    if "ipBlock" in peer:
        return ipblock_matches(peer["ipBlock"], ip)
    other = cluster.pod_by_ip(ip)
    if other is None:
        return False
    ns = other["metadata"]["namespace"]
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], cluster.namespace_labels(ns)):
            return False
    elif ns != policy["metadata"]["namespace"]:
        return False
    if "podSelector" in peer:
        return selector_matches(peer["podSelector"], _labels(other))
    return True


def container_ports(pod: Mapping[str, Any]) -> list[tuple[str | None, str, int]]:
    """(name, protocol, number) of every container port of the pod, all containers together.
    [POD] ContainerPort protocol: "Must be UDP, TCP, or SCTP. Defaults to "TCP"."; name: "Each named
    port in a pod must have a unique name."."""
    return [
        (cp.get("name"), cp.get("protocol") or "TCP", int(cp["containerPort"]))
        for container in (pod.get("spec") or {}).get("containers") or []
        for cp in container.get("ports") or []
    ]


def port_matches(
    entry: Mapping[str, Any], protocol: str, port: int, dst_pod: Mapping[str, Any] | None
) -> bool:
    """One NetworkPolicyPort against the connection's protocol and destination port.

    [API] protocol: "The protocol (TCP, UDP, or SCTP) which traffic must match. If not specified,
    this field defaults to TCP." port: "This can either be a numerical or named port on a pod. If
    this field is not provided, this matches all port names and numbers. If present, only traffic
    on the specified protocol AND port will be matched." endPort: "If set, indicates that the range
    of ports from port to endPort, inclusive, should be allowed by the policy."

    So ``{}`` means every TCP port (not every protocol). A named port is looked up among the
    destination pod's container ports, by name and protocol; no destination pod, no match.
    """
    if (entry.get("protocol") or "TCP") != protocol:
        return False
    want = entry.get("port")
    if want is None:
        return True
    if isinstance(want, str):
        if dst_pod is None:
            return False
        return any(n == want and pr == protocol and num == port for n, pr, num in container_ports(dst_pod))
    end = entry.get("endPort")
    return port == want if end is None else int(want) <= port <= int(end)


def rule_matches(
    cluster: Cluster,
    policy: Mapping[str, Any],
    rule: Mapping[str, Any],
    peers_key: str,
    peer_ip: str,
    protocol: str,
    port: int,
    dst_pod: Mapping[str, Any] | None,
) -> bool:
    """[API] a rule: "The traffic must match both ports and from" (``to`` for egress).
    from/to: "If this field is empty or missing, this rule matches all sources ... If this field is
    present and contains at least one item, this rule allows traffic only if the traffic matches at
    least one item". ports: "If this field is empty or missing, this rule matches all ports ...
    Each item in this list is combined using a logical OR."
    """
    peers = rule.get(peers_key) or []
    if peers and not any(peer_matches(cluster, policy, peer, peer_ip) for peer in peers):
        return False
    ports = rule.get("ports") or []
    return not ports or any(port_matches(entry, protocol, port, dst_pod) for entry in ports)


def _direction_verdict(
    cluster: Cluster,
    pod: Mapping[str, Any],
    direction: str,
    peer_ip: str,
    protocol: str,
    port: int,
    dst_pod: Mapping[str, Any] | None,
) -> tuple[bool, str]:
    """[NP] "When a pod is isolated for egress, the only allowed connections from the pod are those
    allowed by the ``egress`` list of some NetworkPolicy that applies to the pod for egress ... The
    effects of those ``egress`` lists combine additively." (same for ingress). [API] ingress: "If
    this field is empty then this NetworkPolicy does not allow any traffic (and serves solely to
    ensure that the pods it selects are isolated by default)"."""
    policies = applicable_policies(cluster, pod, direction)
    if not policies:
        return True, f"{pod_key(pod)} not isolated for {direction.lower()}"
    section, peers_key = ("ingress", "from") if direction == INGRESS else ("egress", "to")
    for policy in policies:
        for i, rule in enumerate((policy.get("spec") or {}).get(section) or []):
            if rule_matches(cluster, policy, rule, peers_key, peer_ip, protocol, port, dst_pod):
                return True, f"allowed by {_policy_key(policy)} {section}[{i}]"
    names = ", ".join(_policy_key(p) for p in policies)
    return False, f"{pod_key(pod)} isolated for {direction.lower()} by {names}; no rule matches"


def evaluate(cluster: Cluster, src_ip: str, dst_ip: str, protocol: str, port: int) -> Verdict:
    """Whether a new connection src -> dst (protocol, destination port) is allowed, and why.

    [NP] "For a connection from a source pod to a destination pod to be allowed, both the egress
    policy on the source pod and the ingress policy on the destination pod need to allow the
    connection." and "NetworkPolicies apply to a connection with a pod on one or both ends, and are
    not relevant to other connections." Exemptions: the pod's own node (both directions) and the
    pod itself, see the module docstring.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    src_ip, dst_ip = str(ipaddress.ip_address(src_ip)), str(ipaddress.ip_address(dst_ip))
    src_pod, dst_pod = cluster.pod_by_ip(src_ip), cluster.pod_by_ip(dst_ip)

    if src_pod is None:
        egress_ok, egress_why = True, "source is not a pod"
    elif src_ip == dst_ip:
        egress_ok, egress_why = True, "a pod cannot block access to itself"
    elif cluster.node_ips.get(src_pod["spec"]["nodeName"]) == dst_ip:
        egress_ok, egress_why = True, "traffic to the pod's own node is always allowed"
    else:
        egress_ok, egress_why = _direction_verdict(cluster, src_pod, EGRESS, dst_ip, protocol, port, dst_pod)

    if dst_pod is None:
        ingress_ok, ingress_why = True, "destination is not a pod"
    elif src_ip == dst_ip:
        ingress_ok, ingress_why = True, "a pod cannot block access to itself"
    elif cluster.node_ips.get(dst_pod["spec"]["nodeName"]) == src_ip:
        ingress_ok, ingress_why = True, "traffic from the pod's own node is always allowed"
    else:
        ingress_ok, ingress_why = _direction_verdict(
            cluster, dst_pod, INGRESS, src_ip, protocol, port, dst_pod
        )
    return Verdict(egress_ok and ingress_ok, egress_why, ingress_why)


def allowed(cluster: Cluster, src_ip: str, dst_ip: str, protocol: str, port: int) -> bool:
    """Whether a NEW connection from ``src_ip`` to ``dst_ip`` on ``protocol``/``port`` is allowed."""
    return evaluate(cluster, src_ip, dst_ip, protocol, port).allowed


# --- validation (what the API server would refuse) ----------------------------------------------

_IANA_SVC_NAME = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*$")


def _validate_selector(sel: Any, where: str) -> None:
    if not isinstance(sel, dict):
        raise ValueError(f"{where}: a label selector must be an object")
    for req in sel.get("matchExpressions") or []:
        op, values = req.get("operator"), req.get("values") or []
        if op in ("In", "NotIn") and not values:
            raise ValueError(f"{where}: {op} needs values ([LS])")
        if op in ("Exists", "DoesNotExist") and values:
            raise ValueError(f"{where}: {op} takes no values ([LS])")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"{where}: unknown operator {op!r}")


def validate_policy(policy: Mapping[str, Any]) -> None:
    """Raise ValueError for a policy the API would refuse (the rules the reference pages state)."""
    where = _policy_key(policy)
    spec = policy.get("spec") or {}
    if "podSelector" not in spec:
        raise ValueError(f"{where}: podSelector is required ([API])")
    _validate_selector(spec["podSelector"], f"{where} podSelector")
    types = spec.get("policyTypes") or []
    if not set(types) <= {INGRESS, EGRESS} or len(set(types)) != len(types):
        raise ValueError(f"{where}: policyTypes must be Ingress and/or Egress, got {types}")
    for section, peers_key in (("ingress", "from"), ("egress", "to")):
        for i, rule in enumerate(spec.get(section) or []):
            at = f"{where} {section}[{i}]"
            for peer in rule.get(peers_key) or []:
                keys = set(peer) & {"ipBlock", "podSelector", "namespaceSelector"}
                if not keys:
                    raise ValueError(f"{at}: a peer needs ipBlock, podSelector or namespaceSelector")
                if "ipBlock" in keys and len(keys) > 1:
                    raise ValueError(f"{at}: ipBlock excludes the selectors ([API])")
                if "ipBlock" in peer:
                    cidr = ipaddress.ip_network(peer["ipBlock"]["cidr"], strict=False)
                    for exc in peer["ipBlock"].get("except") or []:
                        net = ipaddress.ip_network(exc, strict=False)
                        if net.version != cidr.version or not net.subnet_of(cidr):  # type: ignore[arg-type]
                            raise ValueError(f"{at}: except {exc} outside {cidr} ([API])")
                for key in ("podSelector", "namespaceSelector"):
                    if key in peer:
                        _validate_selector(peer[key], f"{at} {key}")
            for entry in rule.get("ports") or []:
                proto, port, end = entry.get("protocol"), entry.get("port"), entry.get("endPort")
                if proto is not None and proto not in PROTOCOLS:
                    raise ValueError(f"{at}: protocol {proto!r}")
                if isinstance(port, str) and not _IANA_SVC_NAME.match(port):
                    raise ValueError(f"{at}: {port!r} is not a port name")
                if isinstance(port, int) and not 1 <= port <= 65535:
                    raise ValueError(f"{at}: port {port} out of range")
                if end is not None and (not isinstance(port, int) or not port <= end <= 65535):
                    raise ValueError(f"{at}: endPort needs a numeric port <= endPort ([API])")


def validate_cluster(cluster: Cluster) -> None:
    """Raise ValueError for inconsistent input: policies the API refuses, pods in unknown
    namespaces or on unknown nodes, duplicate addresses, duplicate port names in a pod."""
    names = {ns["metadata"]["name"] for ns in cluster.namespaces}
    seen: dict[str, str] = {}
    for node, ip in cluster.node_ips.items():
        seen[ip] = f"node {node}"
    for ip in cluster.external:
        if ip in seen:
            raise ValueError(f"{ip} is both external and {seen[ip]}")
        seen[ip] = "external"
    for pod in cluster.pods:
        if pod["metadata"]["namespace"] not in names:
            raise ValueError(f"{pod_key(pod)}: namespace not in cluster.namespaces")
        if pod["spec"].get("nodeName") not in cluster.node_ips:
            raise ValueError(f"{pod_key(pod)}: node {pod['spec'].get('nodeName')!r} has no address")
        if pod["spec"].get("hostNetwork"):
            raise ValueError(f"{pod_key(pod)}: hostNetwork pods are not modelled")
        port_names = [n for n, _, _ in container_ports(pod) if n]
        if len(port_names) != len(set(port_names)):
            raise ValueError(f"{pod_key(pod)}: duplicate container port names ([POD])")
        addr = pod_ip(pod)
        if addr is not None:
            if addr in seen:
                raise ValueError(f"{pod_key(pod)}: address {addr} already used by {seen[addr]}")
            seen[addr] = pod_key(pod)
    for policy in cluster.policies:
        validate_policy(policy)


# --- feature census -----------------------------------------------------------------------------

ALL_FEATURES = frozenset(
    {
        "policyTypes:inferred",
        "policyTypes:Ingress",
        "policyTypes:Egress",
        "policyTypes:both",
        "policyTypes:ignored-section",
        "podSelector:empty",
        "podSelector:non-empty",
        "ingress:absent",
        "ingress:empty",
        "egress:absent",
        "egress:empty",
        "from:absent",
        "from:empty",
        "to:absent",
        "to:empty",
        "peer:podSelector",
        "peer:namespaceSelector",
        "peer:both",
        "peer:ipBlock",
        "peer:ipBlock-except",
        "selector:empty",
        "selector:matchLabels",
        "selector:metadata.name",
        "op:In",
        "op:NotIn",
        "op:Exists",
        "op:DoesNotExist",
        "ports:absent",
        "ports:empty",
        "port:numeric",
        "port:endPort",
        "port:named",
        "port:protocol-only",
        "port:all-tcp",
        "proto:default",
        "proto:TCP",
        "proto:UDP",
        "proto:SCTP",
    }
)


def _selector_features(sel: Mapping[str, Any]) -> set[str]:
    found: set[str] = set()
    if not sel.get("matchLabels") and not sel.get("matchExpressions"):
        found.add("selector:empty")
    if sel.get("matchLabels"):
        found.add("selector:matchLabels")
    keys = set(sel.get("matchLabels") or {})
    for req in sel.get("matchExpressions") or []:
        found.add(f"op:{req['operator']}")
        keys.add(req["key"])
    if NAMESPACE_NAME_LABEL in keys:
        found.add("selector:metadata.name")
    return found


def feature_census(policies: Iterable[Mapping[str, Any]]) -> set[str]:
    """Which of :data:`ALL_FEATURES` the policies use (to check a generated cluster's coverage)."""
    found: set[str] = set()
    for policy in policies:
        spec = policy.get("spec") or {}
        types = spec.get("policyTypes")
        if not types:
            found.add("policyTypes:inferred")
        else:
            found.add("policyTypes:both" if len(set(types)) == 2 else f"policyTypes:{types[0]}")
        effective = policy_types(policy)
        if (INGRESS not in effective and spec.get("ingress")) or (
            EGRESS not in effective and spec.get("egress")
        ):
            found.add("policyTypes:ignored-section")
        sel_features = _selector_features(spec["podSelector"])
        found.add("podSelector:empty" if "selector:empty" in sel_features else "podSelector:non-empty")
        found |= sel_features - {"selector:empty"}
        for section, peers_key in (("ingress", "from"), ("egress", "to")):
            if section not in spec:
                found.add(f"{section}:absent")
            elif not spec[section]:
                found.add(f"{section}:empty")
            for rule in spec.get(section) or []:
                if peers_key not in rule:
                    found.add(f"{peers_key}:absent")
                elif not rule[peers_key]:
                    found.add(f"{peers_key}:empty")
                for peer in rule.get(peers_key) or []:
                    if "ipBlock" in peer:
                        found.add("peer:ipBlock")
                        if peer["ipBlock"].get("except"):
                            found.add("peer:ipBlock-except")
                    elif "podSelector" in peer and "namespaceSelector" in peer:
                        found.add("peer:both")
                    else:
                        found.add("peer:podSelector" if "podSelector" in peer else "peer:namespaceSelector")
                    for key in ("podSelector", "namespaceSelector"):
                        if key in peer:
                            found |= _selector_features(peer[key])
                if "ports" not in rule:
                    found.add("ports:absent")
                elif not rule["ports"]:
                    found.add("ports:empty")
                for entry in rule.get("ports") or []:
                    found.add(f"proto:{entry['protocol']}" if "protocol" in entry else "proto:default")
                    port = entry.get("port")
                    if port is None:
                        found.add("port:protocol-only" if "protocol" in entry else "port:all-tcp")
                    elif isinstance(port, str):
                        found.add("port:named")
                    else:
                        found.add("port:endPort" if "endPort" in entry else "port:numeric")
    return found


# --- the generator: cluster ---------------------------------------------------------------------

POD_LABEL_VOCAB: dict[str, tuple[str, ...]] = {
    "app": ("web", "db", "api", "cache"),
    "tier": ("front", "back"),
    "env": ("prod", "dev"),
}
NS_LABEL_VOCAB: dict[str, tuple[str, ...]] = {"team": ("blue", "red"), "env": ("prod", "dev")}

# (name or None, protocol, candidate numbers, weight). Names map to different numbers on different
# pods; (number, protocol) never collides between templates, so a pod's ports stay unique.
PORT_TEMPLATES: tuple[tuple[str | None, str, tuple[int, ...], int], ...] = (
    ("http", "TCP", (80, 8080, 8000, 8081), 5),
    ("dns", "UDP", (53, 5353), 3),
    ("sctp-svc", "SCTP", (9000, 9100, 7777), 3),
    ("metrics", "TCP", (9090, 9091), 1),
    (None, "TCP", (443, 6379, 5432), 2),
    (None, "UDP", (5000, 6000), 2),
    (None, "SCTP", (3868, 2905), 1),
)
PORT_NAMES = tuple(t[0] for t in PORT_TEMPLATES if t[0])


def _node_number(name: str, index: int) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else index + 1


def default_node_pod_cidrs(node_names: Sequence[str], pod_cidr: str = DEFAULT_POD_CIDR) -> dict[str, str]:
    """Node ``nodeN`` gets the N-th /24 of the cluster CIDR (10.244.N.0/24 by default)."""
    subnets = list(ipaddress.ip_network(pod_cidr).subnets(new_prefix=24))
    return {name: str(subnets[_node_number(name, i)]) for i, name in enumerate(node_names)}


def _pick_labels(rng: random.Random, vocab: Mapping[str, Sequence[str]], keep: float) -> dict[str, str]:
    return {k: rng.choice(v) for k, v in vocab.items() if rng.random() < keep}


def _random_selector(
    rng: random.Random,
    vocab: Mapping[str, Sequence[str]],
    samples: Sequence[Mapping[str, str]],
    empty_weight: float,
) -> Obj:
    """A selector over ``vocab``, usually built around one of ``samples`` so that it selects something."""
    mode = rng.choices(["empty", "labels", "exprs", "both"], weights=[empty_weight, 4, 3, 2])[0]
    if mode == "empty":
        return {}
    sample = rng.choice(samples) if samples else {}
    keys = list(vocab)
    sel: Obj = {}
    if mode in ("labels", "both"):
        key = rng.choice([k for k in keys if k in sample] or keys)
        sel["matchLabels"] = {key: sample.get(key, rng.choice(vocab[key]))}
    if mode in ("exprs", "both"):
        exprs = []
        for key in rng.sample(keys, k=min(len(keys), rng.choice([1, 1, 2]))):
            op = rng.choice(["In", "NotIn", "Exists", "DoesNotExist"])
            if op in ("In", "NotIn"):
                values = sorted(set(rng.sample(list(vocab[key]), k=rng.randint(1, min(2, len(vocab[key]))))))
                exprs.append({"key": key, "operator": op, "values": values})
            else:
                exprs.append({"key": key, "operator": op})
        sel["matchExpressions"] = exprs
    return sel


def _random_ipblock(rng: random.Random, cluster: Cluster) -> Obj:
    """A CIDR over the pod network or the underlay, often with an ``except`` inside it.

    Pod IPs are not known yet, so the pod-side blocks use whole node subnets and small blocks at
    the start of a node subnet (where sequential IPAM allocates)."""
    kind = rng.choice(["cluster", "node-subnet", "external", "underlay", "world"])
    node_nets = [ipaddress.ip_network(c) for c in cluster.node_pod_cidrs.values()]
    cluster_net = ipaddress.ip_network(cluster.pod_cidr)

    def low_block(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
        prefix = rng.choice([25, 26, 27, 28, 29, 30, 32])
        start = int(net.network_address) + rng.choice([0, 0, 2, 4, 8])
        return str(ipaddress.ip_network(f"{ipaddress.ip_address(start)}/{prefix}", strict=False))

    block: Obj
    if kind == "cluster":
        block = {"cidr": str(cluster_net)}
        choice = rng.random()
        if choice < 0.4:
            block["except"] = [str(rng.choice(node_nets))]
        elif choice < 0.7:
            block["except"] = [low_block(rng.choice(node_nets))]
    elif kind == "node-subnet":
        net = rng.choice(node_nets)
        block = {"cidr": str(net)}
        if rng.random() < 0.6:
            block["except"] = [low_block(net)]
    elif kind in ("external", "underlay") and cluster.external:
        ext = rng.choice(cluster.external)
        prefix = rng.choice([27, 28, 29, 30]) if kind == "external" else 24
        net = ipaddress.ip_network(f"{ext}/{prefix}", strict=False)
        block = {"cidr": str(net)}
        inside = [e for e in cluster.external if ipaddress.ip_address(e) in net]
        inside += [ip for ip in cluster.node_ips.values() if ipaddress.ip_address(ip) in net]
        if rng.random() < 0.6 and inside:
            exc = ipaddress.ip_network(f"{rng.choice(inside)}/{rng.choice([30, 31, 32])}", strict=False)
            if exc.prefixlen > net.prefixlen:
                block["except"] = [str(exc)]
    else:
        block = {"cidr": "0.0.0.0/0", "except": [str(cluster_net)]}
        if rng.random() < 0.5 and cluster.external:
            block["except"].append(f"{rng.choice(cluster.external)}/32")
    return block


def _random_peer(rng: random.Random, cluster: Cluster, namespace: str) -> Obj:
    kind = rng.choices(["pod", "ns", "both", "ip"], weights=[3, 2, 2, 3])[0]
    if kind == "ip":
        return {"ipBlock": _random_ipblock(rng, cluster)}
    ns_vocab = {
        **NS_LABEL_VOCAB,
        NAMESPACE_NAME_LABEL: tuple(n["metadata"]["name"] for n in cluster.namespaces),
    }
    peer: Obj = {}
    if kind in ("ns", "both"):
        peer["namespaceSelector"] = _random_selector(
            rng, ns_vocab, [_labels(n) for n in cluster.namespaces], empty_weight=1.5
        )
    if kind in ("pod", "both"):
        if kind == "pod":
            samples = [_labels(p) for p in cluster.pods if p["metadata"]["namespace"] == namespace]
        else:
            samples = [_labels(p) for p in cluster.pods]
        peer["podSelector"] = _random_selector(rng, POD_LABEL_VOCAB, samples, empty_weight=1.5)
    return peer


def _random_port_entry(rng: random.Random, declared: Sequence[tuple[str | None, str, int]]) -> Obj:
    kind = rng.choices(["numeric", "range", "named", "proto-only", "all-tcp"], weights=[4, 2, 4, 1, 1])[0]
    if kind == "all-tcp":
        return {}
    if kind == "proto-only":
        return {"protocol": rng.choice(PROTOCOLS)}
    if kind == "named":
        template = rng.choice([t for t in PORT_TEMPLATES if t[0]])
        name, proto = template[0], template[1]
        if rng.random() < 0.2:  # a name with the wrong protocol matches nothing
            proto = rng.choice([p for p in PROTOCOLS if p != proto])
        entry: Obj = {"port": name}
    else:
        _, proto, number = rng.choice(declared)
        if rng.random() < 0.15:
            proto = rng.choice([p for p in PROTOCOLS if p != proto])
        if kind == "numeric":
            entry = {"port": number}
        else:
            start = max(1, number - rng.choice([0, 0, 1, 5, 20]))
            entry = {"port": start, "endPort": min(65535, number + rng.choice([0, 1, 10, 100]))}
    if proto != "TCP" or rng.random() < 0.5:
        entry = {"protocol": proto, **entry}
    return entry


def _random_rule(rng: random.Random, cluster: Cluster, namespace: str, peers_key: str) -> Obj:
    rule: Obj = {}
    shape = rng.choices(["absent", "empty", "list"], weights=[2, 1, 7])[0]
    if shape == "empty":
        rule[peers_key] = []
    elif shape == "list":
        rule[peers_key] = [_random_peer(rng, cluster, namespace) for _ in range(rng.randint(1, 3))]
    declared = [cp for pod in cluster.pods for cp in container_ports(pod)]
    shape = rng.choices(["absent", "empty", "list"], weights=[2, 1, 7])[0]
    if shape == "empty":
        rule["ports"] = []
    elif shape == "list":
        rule["ports"] = [_random_port_entry(rng, declared) for _ in range(rng.randint(1, 3))]
    return rule


def _random_policy(rng: random.Random, cluster: Cluster, index: int) -> Obj:
    namespace = rng.choice(cluster.namespaces)["metadata"]["name"]
    local = [_labels(p) for p in cluster.pods if p["metadata"]["namespace"] == namespace]
    spec: Obj = {"podSelector": _random_selector(rng, POD_LABEL_VOCAB, local, empty_weight=2.5)}
    types = rng.choices([None, [INGRESS], [EGRESS], [INGRESS, EGRESS]], weights=[3, 2, 2, 3])[0]
    if types is not None:
        spec["policyTypes"] = types
    for section, peers_key in (("ingress", "from"), ("egress", "to")):
        relevant = types is None or section.capitalize() in types
        shape = rng.choices(["absent", "empty", "rules"], weights=[2, 2, 6] if relevant else [6, 1, 1])[0]
        if shape == "empty":
            spec[section] = []
        elif shape == "rules":
            spec[section] = [
                _random_rule(rng, cluster, namespace, peers_key) for _ in range(rng.randint(1, 3))
            ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"np-{index}", "namespace": namespace},
        "spec": spec,
    }


def make_cluster(
    seed: int,
    *,
    node_ips: Mapping[str, str] | None = None,
    namespaces: Sequence[str] = DEFAULT_NAMESPACES,
    pods: tuple[int, int] = (8, 12),
    policies: tuple[int, int] = (3, 6),
    pod_cidr: str = DEFAULT_POD_CIDR,
    node_pod_cidrs: Mapping[str, str] | None = None,
    external: Sequence[str] = DEFAULT_EXTERNAL,
    policy_draws: int = 8,
) -> Cluster:
    """Phase 1: a random cluster, pods without addresses (``status: {}``).

    ``node_ips`` fixes the nodes (name -> own address); by default 2 or 3 of ``DEFAULT_NODE_IPS``
    are chosen. ``pods``/``policies`` are inclusive count ranges. Each policy is the one of
    ``policy_draws`` random candidates that adds the most not yet used :data:`ALL_FEATURES`.
    """
    rng = random.Random(seed)
    if node_ips is None:
        names = sorted(DEFAULT_NODE_IPS)[: rng.choice([2, 3])]
        node_ips = {n: DEFAULT_NODE_IPS[n] for n in names}
    nodes = sorted(node_ips)
    cidrs = dict(node_pod_cidrs) if node_pod_cidrs else default_node_pod_cidrs(nodes, pod_cidr)
    cluster = Cluster(
        namespaces=[
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": name,
                    "labels": {**_pick_labels(rng, NS_LABEL_VOCAB, 0.7), NAMESPACE_NAME_LABEL: name},
                },
            }
            for name in namespaces
        ],
        pods=[],
        policies=[],
        node_ips=dict(node_ips),
        external=list(external),
        pod_cidr=pod_cidr,
        node_pod_cidrs=cidrs,
    )
    count = rng.randint(*pods)
    ns_order = [namespaces[i % len(namespaces)] for i in range(2 * len(namespaces))]
    node_order = rng.sample(nodes, k=len(nodes))
    for i in range(count):
        ns = ns_order[i] if i < len(ns_order) else rng.choice(namespaces)
        node = node_order[i] if i < len(node_order) else rng.choice(nodes)
        weights = [t[3] for t in PORT_TEMPLATES]
        templates: list[tuple[str | None, str, tuple[int, ...], int]] = []
        n_ports = rng.randint(1, 3)
        while len(templates) < n_ports:
            t = rng.choices(PORT_TEMPLATES, weights=weights)[0]
            if t not in templates:
                templates.append(t)
        ports: list[Obj] = []
        for name, proto, numbers, _ in templates:
            cp: Obj = {"containerPort": rng.choice(numbers), "protocol": proto}
            if name:
                cp = {"name": name, **cp}
            ports.append(cp)
        split = len(ports) > 1 and rng.random() < 0.3  # ports spread over two containers
        containers = (
            [{"name": "main", "ports": ports[:1]}, {"name": "side", "ports": ports[1:]}]
            if split
            else [{"name": "main", "ports": ports}]
        )
        cluster.pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"pod-{i:02d}",
                    "namespace": ns,
                    "labels": _pick_labels(rng, POD_LABEL_VOCAB, 0.75)
                    or {"app": rng.choice(POD_LABEL_VOCAB["app"])},
                },
                "spec": {"nodeName": node, "containers": containers},
                "status": {},
            }
        )
    chosen: list[Obj] = []
    for i in range(rng.randint(*policies)):
        # Greedy feature coverage: of a few random candidates keep the one adding most features.
        covered = feature_census(chosen)
        candidates = [_random_policy(rng, cluster, i) for _ in range(max(1, policy_draws))]
        chosen.append(max(candidates, key=lambda p: len(feature_census([p]) - covered)))
    cluster.policies = chosen
    validate_cluster(cluster)
    return cluster


def host_local_allocator(cluster: Cluster) -> Callable[[Obj], str]:
    """An ``assign_ip`` for pure-Python use: per node, .2, .3, ... of the node's pod subnet."""
    nxt: dict[str, int] = {}

    def assign(pod: Obj) -> str:
        node = pod["spec"]["nodeName"]
        net = ipaddress.ip_network(cluster.node_pod_cidrs[node])
        nxt[node] = nxt.get(node, 1) + 1
        return str(net.network_address + nxt[node])

    return assign


def assign_ips(cluster: Cluster, assign: Callable[[Obj], str] | Mapping[str, str]) -> Cluster:
    """Phase 2: fill ``status.podIP`` of every pod, in order, from a callable (given the pod dict,
    e.g. one that creates the pod and waits for its IPAM address) or a ``{"ns/name": ip}`` map."""
    for pod in cluster.pods:
        ip = assign(pod) if callable(assign) else assign[pod_key(pod)]
        pod.setdefault("status", {})["podIP"] = str(ipaddress.ip_address(ip))
    validate_cluster(cluster)
    return cluster


# --- the generator: cases -----------------------------------------------------------------------

DEFAULT_KIND_WEIGHTS: dict[str, float] = {
    "pod-pod-same-node": 3,
    "pod-pod-cross-node": 3,
    "pod-external": 2,
    "external-pod": 2,
    "node-pod": 2,
    "pod-node": 0,
}


def case_kind(cluster: Cluster, src_ip: str, dst_ip: str) -> str:
    """Classify a connection: pod-pod-same-node, pod-pod-cross-node, pod-external, external-pod,
    node-pod (own node), node-pod-other-node, pod-node, pod-node-other-node, pod-self, other."""
    src, dst = cluster.pod_by_ip(src_ip), cluster.pod_by_ip(dst_ip)
    if src and dst:
        if src is dst:
            return "pod-self"
        same = src["spec"]["nodeName"] == dst["spec"]["nodeName"]
        return "pod-pod-same-node" if same else "pod-pod-cross-node"
    if src and cluster.node_of_ip(dst_ip):
        own = cluster.node_of_ip(dst_ip) == src["spec"]["nodeName"]
        return "pod-node" if own else "pod-node-other-node"
    if dst and cluster.node_of_ip(src_ip):
        own = cluster.node_of_ip(src_ip) == dst["spec"]["nodeName"]
        return "node-pod" if own else "node-pod-other-node"
    if src:
        return "pod-external"
    if dst:
        return "external-pod"
    return "other"


def _port_pool(rng: random.Random, cluster: Cluster) -> list[tuple[str, int]]:
    """(protocol, port) worth trying: declared ports, numbers and range edges from the policies,
    and two random ports."""
    pool = {(proto, num) for pod in cluster.pods for _, proto, num in container_ports(pod)}
    for policy in cluster.policies:
        spec = policy["spec"]
        for section in ("ingress", "egress"):
            for rule in spec.get(section) or []:
                for entry in rule.get("ports") or []:
                    proto = entry.get("protocol") or "TCP"
                    port = entry.get("port")
                    if isinstance(port, int):
                        end = int(entry.get("endPort", port))
                        for num in (port - 1, port, (port + end) // 2, end, end + 1):
                            if 1 <= num <= 65535:
                                pool.add((proto, num))
    for _ in range(2):
        pool.add((rng.choice(PROTOCOLS), rng.randint(1024, 65535)))
    return sorted(pool)


def _pick_port(rng: random.Random, dst_pod: Obj | None, pool: Sequence[tuple[str, int]]) -> tuple[str, int]:
    roll = rng.random()
    declared = container_ports(dst_pod) if dst_pod else []
    if declared and roll < 0.6:
        _, proto, num = rng.choice(declared)
        return proto, num
    if declared and roll < 0.72:
        _, proto, num = rng.choice(declared)
        return rng.choice([p for p in PROTOCOLS if p != proto]), num
    proto, num = rng.choice(pool)
    if rng.random() < 0.2:
        proto = rng.choice(PROTOCOLS)
    return proto, num


def make_cases(
    cluster: Cluster,
    seed: int,
    n: int = 200,
    *,
    allowed_share: float = 0.5,
    kind_weights: Mapping[str, float] | None = None,
    other_node_share: float = 0.3,
    max_draws: int | None = None,
) -> list[Case]:
    """Phase 3: ``n`` distinct cases over the addressed cluster, ``allowed_share`` of them allowed
    (as near as the cluster permits), kinds drawn by ``kind_weights`` (see
    :data:`DEFAULT_KIND_WEIGHTS`). ``other_node_share`` of node-pod/pod-node cases use another
    node's address (not exempt). Candidates are drawn at random, judged by :func:`allowed` and kept
    until both the allowed and the denied quota are full."""
    missing = [pod_key(p) for p in cluster.pods if not pod_ip(p)]
    if missing:
        raise ValueError(f"pods without status.podIP (run assign_ips first): {missing}")
    validate_cluster(cluster)
    rng = random.Random(seed)
    weights = dict(DEFAULT_KIND_WEIGHTS if kind_weights is None else kind_weights)
    nodes = sorted(cluster.node_ips)
    if len(nodes) < 2:
        weights["pod-pod-cross-node"] = 0
    if not cluster.external:
        weights["pod-external"] = weights["external-pod"] = 0
    kinds = [k for k, w in weights.items() if w > 0]
    if not kinds:
        raise ValueError("no case kind has a positive weight")
    pool = _port_pool(rng, cluster)
    pods = cluster.pods
    want_allowed = round(n * allowed_share)
    quota = {True: want_allowed, False: n - want_allowed}
    picked: dict[bool, list[Case]] = {True: [], False: []}
    spare: dict[bool, list[Case]] = {True: [], False: []}
    seen: set[tuple[str, str, str, int]] = set()
    for _ in range(max_draws or 60 * n):
        if all(len(picked[k]) >= quota[k] for k in (True, False)):
            break
        kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
        src_pod = rng.choice(pods)
        dst_pod: Obj | None
        if kind in ("pod-pod-same-node", "pod-pod-cross-node"):
            same = kind == "pod-pod-same-node"
            dsts = [
                p
                for p in pods
                if p is not src_pod and (p["spec"]["nodeName"] == src_pod["spec"]["nodeName"]) == same
            ]
            if not dsts:
                continue
            target = rng.choice(dsts)
            dst_pod, src, dst = target, pod_ip(src_pod), pod_ip(target)
        elif kind == "pod-external":
            dst_pod, src, dst = None, pod_ip(src_pod), rng.choice(cluster.external)
        elif kind == "external-pod":
            dst_pod, src, dst = src_pod, rng.choice(cluster.external), pod_ip(src_pod)
        elif kind in ("node-pod", "pod-node"):
            own = src_pod["spec"]["nodeName"]
            others = [nd for nd in nodes if nd != own]
            node = rng.choice(others) if others and rng.random() < other_node_share else own
            if kind == "node-pod":
                dst_pod, src, dst = src_pod, cluster.node_ips[node], pod_ip(src_pod)
            else:
                dst_pod, src, dst = None, pod_ip(src_pod), cluster.node_ips[node]
        else:
            raise ValueError(f"unknown case kind {kind!r}")
        assert src is not None and dst is not None
        proto, port = _pick_port(rng, dst_pod, pool)
        if (src, dst, proto, port) in seen:
            continue
        seen.add((src, dst, proto, port))
        case = Case(src, dst, proto, port, allowed(cluster, src, dst, proto, port))
        (picked if len(picked[case.expected]) < quota[case.expected] else spare)[case.expected].append(case)
    cases = picked[True] + picked[False]
    short = n - len(cases)
    if short > 0:  # one class ran dry: top up with the other
        cases += (spare[True] + spare[False])[:short]
    rng.shuffle(cases)
    return cases


def generate(
    seed: int,
    assign_ip: Callable[[Obj], str] | Mapping[str, str] | None = None,
    *,
    n_cases: int = 200,
    allowed_share: float = 0.5,
    kind_weights: Mapping[str, float] | None = None,
    **cluster_options: Any,
) -> tuple[Cluster, list[Case]]:
    """All three phases: :func:`make_cluster`, :func:`assign_ips` (``assign_ip`` defaults to
    :func:`host_local_allocator`), :func:`make_cases`. Extra keywords go to ``make_cluster``."""
    cluster = make_cluster(seed, **cluster_options)
    assign_ips(cluster, assign_ip if assign_ip is not None else host_local_allocator(cluster))
    cases = make_cases(cluster, seed, n_cases, allowed_share=allowed_share, kind_weights=kind_weights)
    return cluster, cases


def describe(cluster: Cluster, case: Case | Sequence[Any]) -> str:
    """One line for a failure message: endpoints, kind, expectation and the reference's reasons."""
    src, dst, proto, port = case[0], case[1], case[2], case[3]

    def who(ip: str) -> str:
        pod = cluster.pod_by_ip(ip)
        if pod:
            return f"{pod_key(pod)}@{pod['spec']['nodeName']}({ip})"
        node = cluster.node_of_ip(ip)
        return f"node {node}({ip})" if node else f"host {ip}"

    verdict = evaluate(cluster, src, dst, proto, port)
    word = "ALLOW" if verdict.allowed else "DENY"
    return (
        f"{who(src)} -> {who(dst)} {proto}/{port} [{case_kind(cluster, src, dst)}] expect {word}: "
        f"egress: {verdict.egress}; ingress: {verdict.ingress}"
    )
