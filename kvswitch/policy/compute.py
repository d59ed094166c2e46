"""Cluster-wide policy computation: which pods each rule applies to, which peers and ports it allows.

Selectors are evaluated through label indexes and memoised by (selector, scope), so a cluster of
100k pods, 25k namespaces and 75k policies costs one pass over the policies, not policies x pods.
The output (clauses) is what every node turns into its own flows (:mod:`kvswitch.policy.flows`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kvswitch.policy.model import NamespaceInfo, Peer, PodInfo, Policy, PortSpec, Rule, Selector

PortRange = tuple[str, int, int]  # (protocol, first, last); (proto, 0, 65535) = every port
ALL_PORTS = (0, 65535)


@dataclass(frozen=True)
class Clause:
    """One conjunction: any of ``targets`` may talk with any of ``peers`` on any of ``ports``."""

    key: str  # stable across recomputations: policy, direction, rule, port group
    ingress: bool
    targets: frozenset[str]  # pod keys
    peers: frozenset[str] | None  # IPs and CIDRs; None = any address
    ports: frozenset[PortRange] | None  # None = any protocol and port


@dataclass
class PolicyResult:
    clauses: list[Clause] = field(default_factory=list)
    ingress_isolated: set[str] = field(default_factory=set)
    egress_isolated: set[str] = field(default_factory=set)


class PolicyState:
    """Pods, namespaces and policies with the indexes the selectors need."""

    def __init__(self) -> None:
        self.pods: dict[str, PodInfo] = {}
        self.namespaces: dict[str, NamespaceInfo] = {}
        self.policies: dict[str, Policy] = {}
        self._reindex()

    @classmethod
    def build(
        cls, pods: Iterable[PodInfo], namespaces: Iterable[NamespaceInfo], policies: Iterable[Policy]
    ) -> PolicyState:
        state = cls()
        state.pods = {p.key: p for p in pods}
        state.namespaces = {n.name: n for n in namespaces}
        state.policies = {p.key: p for p in policies}
        state._reindex()
        return state

    def _reindex(self) -> None:
        self._pods_by_ns: dict[str, set[str]] = defaultdict(set)
        self._pods_by_label: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        for key, pod in self.pods.items():
            self._pods_by_ns[pod.namespace].add(key)
            for k, v in pod.labels:
                self._pods_by_label[(pod.namespace, k, v)].add(key)
        self._ns_by_label: dict[tuple[str, str], set[str]] = defaultdict(set)
        for name, ns in self.namespaces.items():
            for k, v in ns.labels:
                self._ns_by_label[(k, v)].add(name)
        self._memo_ns: dict[Selector, frozenset[str]] = {}
        self._memo_pods: dict[str, dict[Selector, frozenset[str]]] = defaultdict(dict)  # by namespace
        self._memo_peer: dict[str | None, dict[Peer, tuple[frozenset[str], frozenset[str]]]] = defaultdict(
            dict
        )

    # --- incremental updates: fix the indexes, forget only the memos that may have changed ------

    def set_pod(self, key: str, pod: PodInfo | None) -> None:
        old = self.pods.pop(key, None)
        if old is not None:
            self._pods_by_ns[old.namespace].discard(key)
            for k, v in old.labels:
                self._pods_by_label[(old.namespace, k, v)].discard(key)
            self._forget(old.namespace)
        if pod is not None:
            self.pods[key] = pod
            self._pods_by_ns[pod.namespace].add(key)
            for k, v in pod.labels:
                self._pods_by_label[(pod.namespace, k, v)].add(key)
            self._forget(pod.namespace)

    def set_namespace(self, name: str, ns: NamespaceInfo | None) -> None:
        old = self.namespaces.pop(name, None)
        if old is not None:
            for k, v in old.labels:
                self._ns_by_label[(k, v)].discard(name)
        if ns is not None:
            self.namespaces[name] = ns
            for k, v in ns.labels:
                self._ns_by_label[(k, v)].add(name)
        self._memo_ns.clear()
        self._memo_peer.pop(None, None)

    def set_policy(self, key: str, policy: Policy | None) -> None:
        if policy is None:
            self.policies.pop(key, None)
        else:
            self.policies[key] = policy

    def _forget(self, namespace: str) -> None:
        """A pod of ``namespace`` changed: its selections, and every namespaceSelector peer."""
        self._memo_pods.pop(namespace, None)
        self._memo_peer.pop(namespace, None)
        self._memo_peer.pop(None, None)

    # --- selectors ------------------------------------------------------------------------

    def select_namespaces(self, sel: Selector) -> frozenset[str]:
        hit = self._memo_ns.get(sel)
        if hit is None:
            candidates = _candidates(sel, lambda k, v: self._ns_by_label.get((k, v), set()), self.namespaces)
            hit = frozenset(n for n in candidates if sel.matches(dict(self.namespaces[n].labels)))
            self._memo_ns[sel] = hit
        return hit

    def select_pods(self, sel: Selector, namespace: str) -> frozenset[str]:
        memo = self._memo_pods[namespace]
        hit = memo.get(sel)
        if hit is None:
            in_ns = self._pods_by_ns.get(namespace, set())
            candidates = _candidates(
                sel, lambda k, v: self._pods_by_label.get((namespace, k, v), set()), in_ns
            )
            hit = frozenset(p for p in candidates if sel.matches(self.pods[p].label_map))
            memo[sel] = hit
        return hit

    def peer_pods(self, peer: Peer, policy_ns: str) -> frozenset[str]:
        return self._peer_sets(peer, policy_ns)[0]

    def _peer_sets(self, peer: Peer, policy_ns: str) -> tuple[frozenset[str], frozenset[str]]:
        """(pod keys, pod IPs) of a selector peer; shared by every policy with the same peer (a
        namespaceSelector peer does not depend on the policy's namespace), like address groups."""
        scope = policy_ns if peer.namespace_selector is None else None
        memo = self._memo_peer[scope]
        hit = memo.get(peer)
        if hit is None:
            ns_sel = peer.namespace_selector
            namespaces = [policy_ns] if ns_sel is None else self.select_namespaces(ns_sel)
            pod_sel = peer.pod_selector or Selector()
            parts = [self.select_pods(pod_sel, ns) for ns in namespaces]
            pods = parts[0] if len(parts) == 1 else frozenset().union(*parts)
            hit = (pods, frozenset(ip for p in pods if (ip := self.pods[p].ip)))
            memo[peer] = hit
        return hit

    # --- rules ----------------------------------------------------------------------------

    def compute(self, namespaces: Iterable[str] | None = None) -> PolicyResult:
        """All clauses, or only those of policies in ``namespaces``: a policy selects pods of its own
        namespace only, so a node needs just the namespaces its pods live in."""
        result = PolicyResult()
        wanted = None if namespaces is None else set(namespaces)
        for policy in self.policies.values():
            if wanted is not None and policy.namespace not in wanted:
                continue
            targets = self.select_pods(policy.pod_selector, policy.namespace)
            if not targets:
                continue
            if policy.ingress is not None:
                result.ingress_isolated |= targets
                for i, rule in enumerate(policy.ingress):
                    result.clauses += self._ingress(policy, i, rule, targets)
            if policy.egress is not None:
                result.egress_isolated |= targets
                for i, rule in enumerate(policy.egress):
                    result.clauses += self._egress(policy, i, rule, targets)
        return result

    def _peer_addresses(
        self, rule: Rule, policy_ns: str
    ) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
        """(pod keys, pod IPs, ipBlock CIDRs) of a rule's peers; a single peer's sets are shared."""
        selectors = [p for p in rule.peers or () if p.ip_block is None]
        cidrs = frozenset(
            str(n) for p in rule.peers or () if p.ip_block is not None for n in p.ip_block.networks()
        )
        sets = [self._peer_sets(p, policy_ns) for p in selectors]
        if len(sets) == 1:
            return sets[0][0], sets[0][1], cidrs
        return (
            frozenset().union(*(s[0] for s in sets)),
            frozenset().union(*(s[1] for s in sets)),
            cidrs,
        )

    @staticmethod
    def _join(ips: frozenset[str], cidrs: frozenset[str]) -> frozenset[str]:
        return ips if not cidrs else cidrs if not ips else ips | cidrs

    def _ingress(self, policy: Policy, index: int, rule: Rule, targets: frozenset[str]) -> list[Clause]:
        peers: frozenset[str] | None = None
        if rule.peers is not None:
            _, ips, cidrs = self._peer_addresses(rule, policy.namespace)
            peers = self._join(ips, cidrs)
            if not peers:
                return []
        base = f"{policy.key}|in|{index}"
        if rule.ports is None:
            return [Clause(base, True, targets, peers, None)]
        # Named ports resolve on each target pod: group targets by what the names mean there.
        groups: dict[frozenset[PortRange], set[str]] = defaultdict(set)
        for t in targets:
            ranges = _resolve(rule.ports, self.pods[t])
            if ranges:
                groups[ranges].add(t)
        return [
            Clause(f"{base}|{_sig(ports)}", True, frozenset(ts), peers, ports) for ports, ts in groups.items()
        ]

    def _egress(self, policy: Policy, index: int, rule: Rule, targets: frozenset[str]) -> list[Clause]:
        base = f"{policy.key}|out|{index}"
        named = rule.ports is not None and any(isinstance(p.port, str) for p in rule.ports)
        if rule.peers is None:
            if rule.ports is None:
                return [Clause(base, False, targets, None, None)]
            clauses = []
            numeric = _resolve(rule.ports, None)
            if numeric:
                clauses.append(Clause(f"{base}|{_sig(numeric)}", False, targets, None, numeric))
            if named:  # any destination pod whose port of that name matches
                clauses += self._named_egress(base, rule.ports, targets, set(self.pods), numeric)
            return clauses
        pods, ips, cidrs = self._peer_addresses(rule, policy.namespace)
        if rule.ports is None:
            peers = self._join(ips, cidrs)
            return [Clause(base, False, targets, peers, None)] if peers else []
        numeric = _resolve(rule.ports, None)
        clauses = []
        if cidrs and numeric:
            clauses.append(Clause(f"{base}|cidr|{_sig(numeric)}", False, targets, cidrs, numeric))
        if not named:
            if ips and numeric:
                clauses.append(Clause(f"{base}|{_sig(numeric)}", False, targets, ips, numeric))
            return clauses
        return clauses + self._named_egress(base, rule.ports, targets, pods, frozenset())

    def _named_egress(
        self,
        base: str,
        ports: tuple[PortSpec, ...],
        targets: frozenset[str],
        peers: Iterable[str],
        already: frozenset[PortRange],
    ) -> list[Clause]:
        """Named ports of an egress rule resolve on each destination pod: group destinations."""
        groups: dict[frozenset[PortRange], set[str]] = defaultdict(set)
        for p in peers:
            pod = self.pods[p]
            if pod.ip:
                ranges = _resolve(ports, pod) - already
                if ranges:
                    groups[ranges].add(pod.ip)
        return [
            Clause(f"{base}|named|{_sig(r)}", False, targets, frozenset(ips), r) for r, ips in groups.items()
        ]


def _candidates(
    sel: Selector, lookup: Callable[[str, str], set[str]], universe: Iterable[str]
) -> Iterable[str]:
    """Narrow by the first In requirement through the index; the full match filters afterwards."""
    for req in sel.requirements:
        if req.operator == "In":
            out: set[str] = set()
            for v in req.values:
                out |= lookup(req.key, v)
            return out
    return universe


def _resolve(ports: tuple[PortSpec, ...], pod: PodInfo | None) -> frozenset[PortRange]:
    """Port ranges a rule's ports mean for ``pod``; a named port needs a pod, else it matches nothing."""
    out: set[PortRange] = set()
    for spec in ports:
        if spec.port is None:
            out.add((spec.protocol, *ALL_PORTS))
        elif isinstance(spec.port, int):
            out.add((spec.protocol, spec.port, spec.end_port or spec.port))
        elif pod is not None:
            out.update((spec.protocol, n, n) for n in pod.resolve(spec.port, spec.protocol))
    return frozenset(out)


def _sig(ports: frozenset[PortRange]) -> str:
    return ",".join(f"{p}:{a}-{b}" for p, a, b in sorted(ports))
