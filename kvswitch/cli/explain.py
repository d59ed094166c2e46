"""NetworkPolicy attribution from the API objects, computed as the agents compute it
(:mod:`kvswitch.policy.compute`): which policies isolate a pod in a direction, which of their rules
select it, and which rule allows a given packet. kvswitchctl never guesses this from flow text: the
trace says where the packet was allowed or dropped, this says which policy and rule that was.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from kvswitch.policy.compute import Clause, PolicyState
from kvswitch.policy.model import Policy, PortSpec, Rule


@dataclass(frozen=True)
class RuleRef:
    """One rule of one NetworkPolicy: ``policy`` is namespace/name, ``rule`` its index in the
    direction's list (``spec.ingress[rule]`` / ``spec.egress[rule]``)."""

    policy: str
    direction: str  # "ingress" | "egress"
    rule: int

    def __str__(self) -> str:
        return f"{self.policy} {self.direction} rule {self.rule}"

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "direction": self.direction, "rule": self.rule}


def clause_rule(clause: Clause) -> RuleRef:
    """The rule a clause came from; its key is ``ns/name|in|3[|ports...]`` (compute.py)."""
    policy, direction, index = clause.key.split("|")[:3]
    return RuleRef(policy, "ingress" if direction == "in" else "egress", int(index))


def address_in(ip: str, peers: frozenset[str] | None) -> bool:
    if peers is None:
        return True
    addr = ipaddress.IPv4Address(ip)
    for p in peers:
        if "/" in p:
            if addr in ipaddress.IPv4Network(p, strict=False):
                return True
        elif p == ip:
            return True
    return False


def port_in(proto: str, port: int | None, ports: frozenset[tuple[str, int, int]] | None) -> bool:
    if ports is None:
        return True
    if port is None:
        return False  # ICMP: a rule that names ports never allows it
    return any(p == proto.upper() and lo <= port <= hi for p, lo, hi in ports)


@dataclass
class DirectionVerdict:
    """What the API's policies say about one direction of one packet at one pod."""

    pod: str  # namespace/name of the pod the direction belongs to
    direction: str
    isolating: list[str] = field(default_factory=list)  # policies that isolate the pod this way
    allowing: list[RuleRef] = field(default_factory=list)  # rules that allow this packet

    @property
    def isolated(self) -> bool:
        return bool(self.isolating)

    @property
    def allowed(self) -> bool:
        return not self.isolating or bool(self.allowing)

    def to_json(self) -> dict[str, Any]:
        return {
            "pod": self.pod,
            "direction": self.direction,
            "isolated": self.isolated,
            "isolatingPolicies": self.isolating,
            "allowedBy": [r.to_json() for r in self.allowing],
            "allowed": self.allowed,
        }

    def describe(self) -> str:
        if not self.isolated:
            return f"{self.pod} is not isolated for {self.direction}: everything is allowed"
        by = ", ".join(self.isolating)
        if self.allowing:
            return f"allowed by {', '.join(str(r) for r in self.allowing)}"
        them = "it" if len(self.isolating) == 1 else "them"
        return (
            f"{self.direction} isolation default: {self.pod} is isolated for {self.direction} by {by}, "
            f"and no {self.direction} rule of {them} allows this packet"
        )


def isolating_policies(state: PolicyState, pod_key: str, direction: str) -> list[Policy]:
    pod = state.pods.get(pod_key)
    if pod is None:
        return []
    out = []
    for policy in state.policies.values():
        rules = policy.ingress if direction == "ingress" else policy.egress
        if (
            policy.namespace == pod.namespace
            and rules is not None
            and pod_key in state.select_pods(policy.pod_selector, policy.namespace)
        ):
            out.append(policy)
    return sorted(out, key=lambda p: p.key)


def judge(
    state: PolicyState, pod_key: str, direction: str, peer_ip: str, proto: str, port: int | None
) -> DirectionVerdict:
    """``direction`` of pod ``pod_key`` for a packet to (egress) or from (ingress) ``peer_ip``."""
    verdict = DirectionVerdict(
        pod_key, direction, [p.key for p in isolating_policies(state, pod_key, direction)]
    )
    pod = state.pods.get(pod_key)
    if pod is None or not verdict.isolating:
        return verdict
    ingress = direction == "ingress"
    rules = set()
    for clause in state.compute(namespaces=[pod.namespace]).clauses:
        if clause.ingress != ingress or pod_key not in clause.targets:
            continue
        if address_in(peer_ip, clause.peers) and port_in(proto, port, clause.ports):
            rules.add(clause_rule(clause))
    verdict.allowing = sorted(rules, key=lambda r: (r.policy, r.rule))
    return verdict


# --- what selects a pod (kvswitchctl policy) --------------------------------------------------------


def describe_ports(ports: tuple[PortSpec, ...] | None) -> str:
    if ports is None:
        return "any port"
    parts = []
    for p in ports:
        if p.port is None:
            parts.append(f"{p.protocol} any")
        elif p.end_port:
            parts.append(f"{p.protocol} {p.port}-{p.end_port}")
        else:
            parts.append(f"{p.protocol} {p.port}")
    return ", ".join(parts)


def describe_peers(rule: Rule, direction: str) -> str:
    word = "from" if direction == "ingress" else "to"
    if rule.peers is None:
        return f"{word} anywhere"
    parts = []
    for peer in rule.peers:
        if peer.ip_block is not None:
            ex = f" except {', '.join(peer.ip_block.excepts)}" if peer.ip_block.excepts else ""
            parts.append(f"ipBlock {peer.ip_block.cidr}{ex}")
            continue
        sel = []
        if peer.namespace_selector is not None:
            sel.append(f"namespaces {_selector(peer.namespace_selector)}")
        if peer.pod_selector is not None:
            sel.append(f"pods {_selector(peer.pod_selector)}")
        parts.append(" and ".join(sel))
    return f"{word} " + "; ".join(parts)


def _selector(sel: Any) -> str:
    if sel.everything:
        return "{all}"
    reqs = []
    for r in sel.requirements:
        if r.operator == "In" and len(r.values) == 1:
            reqs.append(f"{r.key}={next(iter(r.values))}")
        elif r.operator in ("Exists", "DoesNotExist"):
            reqs.append(f"{'!' if r.operator == 'DoesNotExist' else ''}{r.key}")
        else:
            reqs.append(f"{r.key} {r.operator.lower()} ({','.join(sorted(r.values))})")
    return "{" + ",".join(reqs) + "}"


def pod_policies(state: PolicyState, pod_key: str) -> dict[str, Any]:
    """Per direction: the policies that select the pod and each of their rules (with the peers and
    ports it resolves to for this pod); and the rules of any policy that have this pod as a peer."""
    pod = state.pods.get(pod_key)
    if pod is None:
        raise KeyError(pod_key)
    result = state.compute()
    by_rule: dict[RuleRef, list[Clause]] = {}
    for clause in result.clauses:
        by_rule.setdefault(clause_rule(clause), []).append(clause)
    out: dict[str, Any] = {"pod": pod_key, "ip": pod.ip, "node": pod.node}
    for direction in ("ingress", "egress"):
        entries = []
        for policy in isolating_policies(state, pod_key, direction):
            rules = policy.ingress if direction == "ingress" else policy.egress
            assert rules is not None
            rule_out = []
            for i, rule in enumerate(rules):
                ref = RuleRef(policy.key, direction, i)
                clauses = [c for c in by_rule.get(ref, []) if pod_key in c.targets]
                peers: set[str] | None = set()
                for c in clauses:
                    if c.peers is None:
                        peers = None
                    elif peers is not None:
                        peers |= c.peers
                rule_out.append(
                    {
                        "rule": i,
                        "peers": describe_peers(rule, direction),
                        "ports": describe_ports(rule.ports),
                        "resolvedPeers": None if peers is None else sorted(peers),
                        "selectsNothing": not clauses,
                    }
                )
            entries.append({"policy": policy.key, "rules": rule_out})
        out[direction] = {"isolated": bool(entries), "policies": entries}
    peer_of = []
    if pod.ip:
        for ref, clauses in sorted(
            by_rule.items(), key=lambda kv: (kv[0].policy, kv[0].direction, kv[0].rule)
        ):
            if any(c.peers is not None and address_in(pod.ip, c.peers) for c in clauses):
                targets = sorted(set().union(*(c.targets for c in clauses)))
                peer_of.append({**ref.to_json(), "targets": targets})
    out["peerOf"] = peer_of
    return out
