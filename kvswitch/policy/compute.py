"""Cluster-wide policy computation: which pods each rule applies to, which peers and ports it allows.

Selectors are evaluated through label indexes and memoised by (selector, scope), so a cluster of
100k pods, 25k namespaces and 75k policies costs one pass over the policies, not policies x pods.
The output (clauses) is what every node turns into its own flows (:mod:`kvswitch.policy.flows`).

Incremental, like address groups: a policy's cached outcome (:class:`PolicyEntry`) refers to the
memoised selections it reads -- its target group (a pod selector in its namespace) and the peer
sets of its rules (a peer selector in its scope) -- instead of copying their members. Events
update the indexes at once and are remembered; the next computation brings the memoised
selections up to date for just the pods and namespaces that changed (a pod is checked against the
selectors memoised for its namespace, a namespace against the namespace selectors), recomputes
the peer sets built from selections that changed, and reports which selections changed
(:meth:`PolicyState.take_changes`). A policy is recomputed only when it changed, or when a
selection it reads became empty or non-empty, or changed while the policy needs its members one by
one (named ports). So a pod relabelled out of a peer set 1,000 policies share costs one selection
update, and the node renders the difference once for the set, not once per policy.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from kvswitch.gc_pause import paused_gc
from kvswitch.policy.model import (
    ALL_PORTS,
    IPBlock,
    NamespaceInfo,
    Peer,
    PodInfo,
    Policy,
    PortRange,
    PortSpec,
    Rule,
    Selector,
)

__all__ = [
    "ALL_PORTS",
    "ANY_ADDRESS",
    "Clause",
    "ClauseSpec",
    "GroupKey",
    "PeerKey",
    "PolicyEntry",
    "PolicyResult",
    "PolicyState",
    "PortRange",
    "paused_gc",
]
ANY_ADDRESS = "0.0.0.0/0"
_NONE: frozenset[str] = frozenset()
LABEL_INDEX_MIN = 64  # pods in a namespace from which its pods are indexed by label
_K = TypeVar("_K")
_V = TypeVar("_V")
GroupKey = tuple[Selector, str]  # a pod selector evaluated in one namespace
PeerKey = tuple[Peer, str | None]  # a selector peer and its scope (None: namespaceSelector peers)
# What a policy reads: (selection, whether it needs the members or only whether there are any).
Deps = tuple[tuple[tuple[GroupKey, bool], ...], tuple[tuple[PeerKey, bool], ...], tuple[str, ...]]
_NO_DEPS: Deps = ((), (), ())


@dataclass(frozen=True, slots=True)
class Clause:
    """One conjunction: any of ``targets`` may talk with any of ``peers`` on any of ``ports``."""

    key: str  # stable across recomputations: policy, direction, rule, port group
    ingress: bool
    targets: frozenset[str]  # pod keys
    peers: frozenset[str] | None  # pod IPs and CIDRs (a /32 as its bare address); None = any address
    ports: frozenset[PortRange] | None  # None = any protocol and port


class ClauseSpec(NamedTuple):
    """A clause as cached: by reference to the selections it follows. Its targets are the policy's
    target group (``targets`` None) or the listed pods; its peers are the IPs of ``peer_groups``
    plus the fixed ``peers`` (CIDRs, or IPs resolved per pod for named ports); no groups and
    ``peers`` None = any address."""

    key: str
    ingress: bool
    targets: frozenset[str] | None
    peer_groups: tuple[PeerKey, ...]
    peers: frozenset[str] | None
    ports: frozenset[PortRange] | None

    @property
    def any_peer(self) -> bool:
        return self.peers is None and not self.peer_groups


@dataclass
class PolicyResult:
    clauses: list[Clause] = field(default_factory=list)
    ingress_isolated: set[str] = field(default_factory=set)
    egress_isolated: set[str] = field(default_factory=set)
    # Policies with the audit log on (kvswitch.io/log), and the pods such a policy isolates.
    logged: set[str] = field(default_factory=set)
    audited_ingress: set[str] = field(default_factory=set)
    audited_egress: set[str] = field(default_factory=set)


class PolicyEntry(NamedTuple):
    """One policy's cached outcome: its target group and its clauses (empty while the group is)."""

    policy: Policy
    target_group: GroupKey
    clauses: tuple[ClauseSpec, ...]


@dataclass(frozen=True, slots=True)
class _PeerSet:
    namespaces: tuple[str, ...]
    pods: frozenset[str]
    ips: frozenset[str]


class _Collect:
    """What one policy's computation reads."""

    __slots__ = ("names", "peers", "targets_full")

    def __init__(self) -> None:
        self.peers: dict[PeerKey, bool] = {}
        self.names: set[str] = set()
        self.targets_full = False


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
        state = cls.__new__(cls)
        with paused_gc():
            state.pods = {p.key: p for p in pods}
            state.namespaces = {n.name: n for n in namespaces}
            state.policies = {p.key: p for p in policies}
            state._reindex()
        return state

    def _reindex(self) -> None:
        self._pods_by_ns: dict[str, set[str]] = defaultdict(set)
        # Label indexes of the namespaces with many pods only (a small one is scanned faster than
        # its index costs: 50k pods in 5k namespaces would hold 50k small sets).
        self._pods_by_label: dict[str, dict[tuple[str, str], set[str]]] = {}
        self._pods_by_port: dict[str, set[str]] | None = None  # named ports, built when first needed
        for key, pod in self.pods.items():
            self._index_pod(key, pod)
        self._ns_by_label: dict[tuple[str, str], set[str]] = defaultdict(set)
        for name, ns in self.namespaces.items():
            for k, v in ns.labels:
                self._ns_by_label[(k, v)].add(name)
        self._policies_by_ns: dict[str, set[str]] = defaultdict(set)
        for key, policy in self.policies.items():
            self._policies_by_ns[policy.namespace].add(key)
        # Memoised selections, kept up to date in place (see _refresh).
        self._memo_ns: dict[Selector, frozenset[str]] = {}
        self._memo_pods: dict[str, dict[Selector, frozenset[str]]] = defaultdict(dict)  # by namespace
        self._memo_peer: dict[PeerKey, _PeerSet] = {}
        self._peers_of_group: dict[GroupKey, set[PeerKey]] = defaultdict(set)
        self._peers_of_nssel: dict[Selector, set[PeerKey]] = defaultdict(set)
        # Cached policies and what they read (policy key -> True: the members, False: emptiness).
        self._cache: dict[str, PolicyEntry] = {}
        self._by_group: dict[GroupKey, dict[str, bool]] = defaultdict(dict)
        self._by_peer: dict[PeerKey, dict[str, bool]] = defaultdict(dict)
        self._by_port_name: dict[str, set[str]] = defaultdict(set)
        self._registered: dict[str, Deps] = {}
        # Changes since the last refresh: each pod / namespace as it was then.
        self._pending_pods: dict[str, PodInfo | None] = {}
        self._pending_ns: dict[str, NamespaceInfo | None] = {}
        # Changes since take_changes was last called.
        self._dirty: set[str] = set(self.policies)
        self._changed_groups: set[GroupKey] = set()
        self._changed_peers: set[PeerKey] = set()
        self._deps = _Collect()  # being collected by _entry

    def _index_pod(self, key: str, pod: PodInfo, add: bool = True) -> None:
        ns = pod.namespace
        by_label = self._pods_by_label.get(ns)
        by_port = self._pods_by_port
        if add:
            in_ns = self._pods_by_ns[ns]
            in_ns.add(key)
            if by_label is not None:
                for label in pod.labels:
                    by_label.setdefault(label, set()).add(key)
            elif len(in_ns) >= LABEL_INDEX_MIN:
                self._pods_by_label[ns] = self._label_index(in_ns)
            if by_port is not None:
                for p in pod.ports:
                    if p.name:
                        by_port.setdefault(p.name, set()).add(key)
            return
        _discard(self._pods_by_ns, ns, key)
        if by_label is not None:
            if len(self._pods_by_ns.get(ns, ())) < LABEL_INDEX_MIN // 2:
                del self._pods_by_label[ns]
            else:
                for label in pod.labels:
                    _discard(by_label, label, key)
        if by_port is not None:
            for p in pod.ports:
                if p.name:
                    _discard(by_port, p.name, key)

    def _label_index(self, keys: Iterable[str]) -> dict[tuple[str, str], set[str]]:
        index: dict[tuple[str, str], set[str]] = {}
        for key in keys:
            for label in self.pods[key].labels:
                index.setdefault(label, set()).add(key)
        return index

    def _pods_with_port(self, name: str) -> set[str]:
        if self._pods_by_port is None:
            self._pods_by_port = {}
            for key, pod in self.pods.items():
                for p in pod.ports:
                    if p.name:
                        self._pods_by_port.setdefault(p.name, set()).add(key)
        return self._pods_by_port.get(name, set())

    # --- events: indexes now, memos at the next computation -------------------------------

    def set_pod(self, key: str, pod: PodInfo | None) -> None:
        old = self.pods.get(key)
        if old == pod:
            return
        if old is not None:
            self._index_pod(key, old, add=False)
            del self.pods[key]
        if pod is not None:
            self.pods[key] = pod
            self._index_pod(key, pod)
        self._pending_pods.setdefault(key, old)

    def set_namespace(self, name: str, ns: NamespaceInfo | None) -> None:
        old = self.namespaces.get(name)
        if old == ns:
            return
        if old is not None:
            for k, v in old.labels:
                _discard(self._ns_by_label, (k, v), name)
            del self.namespaces[name]
        if ns is not None:
            self.namespaces[name] = ns
            for k, v in ns.labels:
                self._ns_by_label[(k, v)].add(name)
        self._pending_ns.setdefault(name, old)

    def set_policy(self, key: str, policy: Policy | None) -> None:
        old = self.policies.get(key)
        if old == policy:
            return
        if old is not None:
            _discard(self._policies_by_ns, old.namespace, key)
            del self.policies[key]
        self._dirty.add(key)
        if policy is not None:
            self.policies[key] = policy
            self._policies_by_ns[policy.namespace].add(key)
            self._cache.pop(key, None)
        else:
            self.forget(key)

    def policies_in(self, namespace: str) -> set[str]:
        return self._policies_by_ns.get(namespace, set())

    def take_changes(self) -> tuple[set[str], set[GroupKey], set[PeerKey]]:
        """Since the last call: the keys of the policies whose entry may differ (added, changed,
        removed, or reading a selection that changed as they care), the target groups whose
        members changed, and the peer sets whose IPs changed."""
        self._refresh()
        out = (self._dirty, self._changed_groups, self._changed_peers)
        self._dirty, self._changed_groups, self._changed_peers = set(), set(), set()
        return out

    def _refresh(self) -> None:
        """Bring the memoised selections up to date with the pending events; forget the entries
        of the policies that read them in a way the change matters to."""
        if not self._pending_pods and not self._pending_ns:
            return
        content: set[GroupKey] = set()  # a member's IP or ports changed
        port_names: set[str] = set()
        moves: dict[GroupKey, tuple[set[str], set[str]]] = defaultdict(lambda: (set(), set()))
        pending_pods, self._pending_pods = self._pending_pods, {}
        for key, old in pending_pods.items():
            new = self.pods.get(key)
            if old == new:
                continue
            some = new if new is not None else old
            assert some is not None
            changed = old is None or new is None or old.ip != new.ip or old.ports != new.ports
            if changed:
                port_names.update(
                    p.name for pod in (old, new) if pod is not None for p in pod.ports if p.name
                )
            memo = self._memo_pods.get(some.namespace)
            if not memo:
                continue
            labels = new.label_map if new is not None else None
            for sel, members in memo.items():
                was = key in members
                now = labels is not None and sel.matches(labels)
                if was != now:
                    moves[(sel, some.namespace)][1 if was else 0].add(key)
                elif was and changed:
                    content.add((sel, some.namespace))
        dirty: set[str] = set()
        for g, (added, removed) in moves.items():
            memo = self._memo_pods[g[1]]
            before = memo[g[0]]
            after = memo[g[0]] = (before - removed) | added
            flip = bool(before) != bool(after)
            dirty.update(k for k, full in self._by_group.get(g, {}).items() if full or flip)
            self._changed_groups.add(g)
        for g in content - moves.keys():
            dirty.update(k for k, full in self._by_group.get(g, {}).items() if full)

        changed_nssels: set[Selector] = set()
        pending_ns, self._pending_ns = self._pending_ns, {}
        ns_moves: dict[Selector, tuple[set[str], set[str]]] = defaultdict(lambda: (set(), set()))
        for name, old_ns in pending_ns.items():
            new_ns = self.namespaces.get(name)
            if old_ns == new_ns:
                continue
            ns_labels = dict(new_ns.labels) if new_ns is not None else None
            for sel, names in self._memo_ns.items():
                was = name in names
                now = ns_labels is not None and sel.matches(ns_labels)
                if was != now:
                    ns_moves[sel][1 if was else 0].add(name)
        for sel, (added, removed) in ns_moves.items():
            self._memo_ns[sel] = (self._memo_ns[sel] - removed) | added
            changed_nssels.add(sel)

        dirty_peers: set[PeerKey] = set()
        for g in moves.keys() | content:
            dirty_peers |= self._peers_of_group.get(g, set())
        for s in changed_nssels:
            dirty_peers |= self._peers_of_nssel.get(s, set())
        for pk in dirty_peers:
            before_set = self._memo_peer.get(pk)
            if before_set is None:
                continue
            after_set = self._recompute_peer(pk)
            flip = bool(before_set.ips) != bool(after_set.ips)
            dirty.update(k for k, full in self._by_peer.get(pk, {}).items() if full or flip)
            if before_set.ips != after_set.ips:
                self._changed_peers.add(pk)
        for name in port_names:
            dirty |= self._by_port_name.get(name, set())
        for key in dirty:
            self._dirty.add(key)
            self._cache.pop(key, None)  # what it read stays registered: most often read again

    def forget(self, key: str) -> None:
        """Stop keeping what policy ``key`` read up to date (its node no longer needs it)."""
        self._cache.pop(key, None)
        self._register(key, _NO_DEPS)

    def _register(self, key: str, deps: Deps) -> None:
        old = self._registered.pop(key, _NO_DEPS)
        if deps != _NO_DEPS:
            self._registered[key] = deps
        if old == deps:
            return
        for g, full in deps[0]:
            self._by_group[g][key] = full
        for pk, full in deps[1]:
            self._by_peer[pk][key] = full
        for name in deps[2]:
            self._by_port_name[name].add(key)
        for g in {g for g, _ in old[0]} - {g for g, _ in deps[0]}:
            _pop(self._by_group, g, key)
            self._maybe_drop_group(g)
        for pk in {pk for pk, _ in old[1]} - {pk for pk, _ in deps[1]}:
            _pop(self._by_peer, pk, key)
            if pk not in self._by_peer:
                self._drop_peer(pk)
        for name in set(old[2]) - set(deps[2]):
            _discard(self._by_port_name, name, key)

    # --- memoised selections ----------------------------------------------------------------

    def _maybe_drop_group(self, g: GroupKey) -> None:
        """A selection nothing reads any more is not kept up to date either."""
        if g not in self._by_group and g not in self._peers_of_group:
            memo = self._memo_pods.get(g[1])
            if memo is not None:
                memo.pop(g[0], None)
                if not memo:
                    del self._memo_pods[g[1]]

    def _drop_peer(self, pk: PeerKey) -> None:
        ps = self._memo_peer.pop(pk, None)
        if ps is None:
            return
        pod_sel = pk[0].pod_selector or Selector()
        for ns in ps.namespaces:
            _discard(self._peers_of_group, (pod_sel, ns), pk)
            self._maybe_drop_group((pod_sel, ns))
        ns_sel = pk[0].namespace_selector
        if ns_sel is not None:
            _discard(self._peers_of_nssel, ns_sel, pk)
            if ns_sel not in self._peers_of_nssel:
                self._memo_ns.pop(ns_sel, None)

    def select_namespaces(self, sel: Selector) -> frozenset[str]:
        self._refresh()
        return self._select_namespaces(sel)

    def _select_namespaces(self, sel: Selector) -> frozenset[str]:
        hit = self._memo_ns.get(sel)
        if hit is None:
            candidates = _candidates(sel, lambda k, v: self._ns_by_label.get((k, v), set()), self.namespaces)
            hit = frozenset(n for n in candidates if sel.matches(dict(self.namespaces[n].labels)))
            self._memo_ns[sel] = hit
        return hit

    def select_pods(self, sel: Selector, namespace: str) -> frozenset[str]:
        self._refresh()
        return self._select_pods(sel, namespace)

    def _select_pods(self, sel: Selector, namespace: str) -> frozenset[str]:
        memo = self._memo_pods[namespace]
        hit = memo.get(sel)
        if hit is None:
            in_ns = self._pods_by_ns.get(namespace, set())
            by_label = self._pods_by_label.get(namespace)
            candidates = (
                in_ns
                if by_label is None
                else _candidates(sel, lambda k, v: by_label.get((k, v), set()), in_ns)
            )
            hit = frozenset(p for p in candidates if sel.matches(self.pods[p].label_map))
            memo[sel] = hit
        return hit

    def group_members(self, group: GroupKey) -> frozenset[str]:
        """The pods of a target group (as of the last take_changes)."""
        return self._select_pods(*group)

    def peer_ips(self, pk: PeerKey) -> frozenset[str] | None:
        """The IPs of a peer set a cached entry reads (as of the last take_changes)."""
        ps = self._memo_peer.get(pk)
        return None if ps is None else ps.ips

    def peer_pods(self, peer: Peer, policy_ns: str) -> frozenset[str]:
        self._refresh()
        return self._peer_sets(peer, policy_ns).pods

    def _peer_sets(self, peer: Peer, policy_ns: str) -> _PeerSet:
        """Pod keys and IPs of a selector peer; shared by every policy with the same peer (a
        namespaceSelector peer does not depend on the policy's namespace), like address groups."""
        pk: PeerKey = (peer, policy_ns if peer.namespace_selector is None else None)
        hit = self._memo_peer.get(pk)
        return hit if hit is not None else self._recompute_peer(pk)

    def _recompute_peer(self, pk: PeerKey) -> _PeerSet:
        peer, scope = pk
        ns_sel = peer.namespace_selector
        if ns_sel is None:
            assert scope is not None
            namespaces: tuple[str, ...] = (scope,)
        else:
            namespaces = tuple(self._select_namespaces(ns_sel))
            self._peers_of_nssel[ns_sel].add(pk)
        pod_sel = peer.pod_selector or Selector()
        parts = []
        for ns in namespaces:
            parts.append(self._select_pods(pod_sel, ns))
            self._peers_of_group[(pod_sel, ns)].add(pk)
        pods = parts[0] if len(parts) == 1 else frozenset().union(*parts)
        pod_of = self.pods
        ps = _PeerSet(namespaces, pods, frozenset(ip for p in pods if (ip := pod_of[p].ip)))
        old = self._memo_peer.get(pk)
        self._memo_peer[pk] = ps
        if old is not None:
            for ns in set(old.namespaces) - set(namespaces):
                _discard(self._peers_of_group, (pod_sel, ns), pk)
                self._maybe_drop_group((pod_sel, ns))
        return ps

    # --- rules ----------------------------------------------------------------------------

    def compute(self, namespaces: Iterable[str] | None = None) -> PolicyResult:
        """All clauses, or only those of policies in ``namespaces``: a policy selects pods of its own
        namespace only, so a node needs just the namespaces its pods live in."""
        with paused_gc():
            return self._compute(namespaces)

    def _compute(self, namespaces: Iterable[str] | None) -> PolicyResult:
        self._refresh()
        result = PolicyResult()
        if namespaces is None:
            keys: Iterable[str] = list(self.policies)
        else:
            keys = [k for ns in set(namespaces) for k in self._policies_by_ns.get(ns, ())]
        for key in keys:
            entry = self._entry(key)
            targets = _NONE if entry is None else self._select_pods(*entry.target_group)
            if entry is None or not targets:
                continue
            if entry.policy.ingress is not None:
                result.ingress_isolated |= targets
            if entry.policy.egress is not None:
                result.egress_isolated |= targets
            if entry.policy.log:
                result.logged.add(key)
                if entry.policy.ingress is not None:
                    result.audited_ingress |= targets
                if entry.policy.egress is not None:
                    result.audited_egress |= targets
            result.clauses += (self.materialize(c, targets) for c in entry.clauses)
        return result

    def materialize(self, spec: ClauseSpec, targets: frozenset[str]) -> Clause:
        """A cached clause with the current members of what it refers to (``targets``: the
        policy's target group)."""
        if spec.any_peer:
            peers = None
        else:
            parts = [self._memo_peer[pk].ips for pk in spec.peer_groups]
            fixed = spec.peers or _NONE
            peers = parts[0] if not fixed and len(parts) == 1 else fixed.union(*parts)
        return Clause(
            spec.key, spec.ingress, targets if spec.targets is None else spec.targets, peers, spec.ports
        )

    def entry(self, key: str) -> PolicyEntry | None:
        """Policy ``key``'s cached entry (up to date as of the last take_changes)."""
        return self._entry(key)

    def _entry(self, key: str) -> PolicyEntry | None:
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        policy = self.policies.get(key)
        if policy is None:
            return None
        deps = self._deps = _Collect()
        group = (policy.pod_selector, policy.namespace)
        targets = self._select_pods(*group)
        clauses: list[ClauseSpec] = []
        if targets:
            for i, rule in enumerate(policy.ingress or ()):
                clauses += self._ingress(policy, i, rule, targets)
            for i, rule in enumerate(policy.egress or ()):
                clauses += self._egress(policy, i, rule)
        entry = PolicyEntry(policy, group, tuple(clauses))
        self._cache[key] = entry
        self._register(
            key, (((group, deps.targets_full),), tuple(deps.peers.items()), tuple(sorted(deps.names)))
        )
        return entry

    def _peer_groups(
        self, rule: Rule, policy_ns: str, full: bool = False
    ) -> tuple[tuple[PeerKey, ...], frozenset[str], bool]:
        """A rule's selector peers (as peer sets), its ipBlock CIDRs, and whether any peer set has
        an IP. ``full``: the caller reads the peer sets' pods, not only whether they are empty."""
        peers = rule.peers or ()
        reads = self._deps.peers
        if len(peers) == 1 and peers[0].ip_block is None:  # the common case, kept short
            p = peers[0]
            pk: PeerKey = (p, policy_ns if p.namespace_selector is None else None)
            reads[pk] = full or reads.get(pk, False)
            ps = self._memo_peer.get(pk) or self._recompute_peer(pk)
            return (pk,), _NONE, bool(ps.ips)
        keys: list[PeerKey] = []
        blocks = []
        nonempty = False
        for p in peers:
            if p.ip_block is not None:
                blocks.append(p.ip_block)
                continue
            pk = (p, policy_ns if p.namespace_selector is None else None)
            reads[pk] = full or reads.get(pk, False)
            keys.append(pk)
            ps = self._memo_peer.get(pk) or self._recompute_peer(pk)
            nonempty = nonempty or bool(ps.ips)
        cidrs = frozenset().union(*map(_block_addresses, blocks)) if blocks else _NONE
        return tuple(dict.fromkeys(keys)), cidrs, nonempty

    def _ingress(self, policy: Policy, index: int, rule: Rule, targets: frozenset[str]) -> list[ClauseSpec]:
        groups: tuple[PeerKey, ...] = ()
        fixed: frozenset[str] | None = None
        if rule.peers is not None:
            groups, fixed, nonempty = self._peer_groups(rule, policy.namespace)
            if not nonempty:
                groups = ()  # the same addresses; and no group to follow
                if not fixed:
                    return []
        base = f"{policy.key}|in|{index}"
        if rule.ports is None:
            return [ClauseSpec(base, True, None, groups, fixed, None)]
        if not rule.named:  # the same ports for every target
            return [ClauseSpec(f"{base}|{_sig(rule.numeric)}", True, None, groups, fixed, rule.numeric)]
        # Named ports resolve on each target pod: group targets by what the names mean there.
        self._deps.targets_full = True
        by_ports: dict[frozenset[PortRange], set[str]] = defaultdict(set)
        for t in targets:
            ranges = _resolve(rule.ports, self.pods[t])
            if ranges:
                by_ports[ranges].add(t)
        return [
            ClauseSpec(f"{base}|{_sig(ports)}", True, frozenset(ts), groups, fixed, ports)
            for ports, ts in by_ports.items()
        ]

    def _egress(self, policy: Policy, index: int, rule: Rule) -> list[ClauseSpec]:
        base = f"{policy.key}|out|{index}"
        named = rule.named
        numeric = rule.numeric
        if rule.peers is None:
            if rule.ports is None:
                return [ClauseSpec(base, False, None, (), None, None)]
            clauses = []
            if numeric:
                clauses.append(ClauseSpec(f"{base}|{_sig(numeric)}", False, None, (), None, numeric))
            if named:  # any destination pod whose port of that name matches
                names = {p.port for p in rule.ports if isinstance(p.port, str)}
                self._deps.names.update(names)
                candidates = set().union(*(self._pods_with_port(n) for n in names))
                clauses += self._named_egress(base, rule.ports, candidates, numeric)
            return clauses
        full = named and rule.ports is not None
        groups, cidrs, nonempty = self._peer_groups(rule, policy.namespace, full)
        if rule.ports is None:
            if not nonempty:
                return [ClauseSpec(base, False, None, (), cidrs, None)] if cidrs else []
            return [ClauseSpec(base, False, None, groups, cidrs, None)]
        clauses = []
        if cidrs and numeric:
            clauses.append(ClauseSpec(f"{base}|cidr|{_sig(numeric)}", False, None, (), cidrs, numeric))
        if not named:
            if nonempty and numeric:
                clauses.append(ClauseSpec(f"{base}|{_sig(numeric)}", False, None, groups, _NONE, numeric))
            return clauses
        pods = frozenset().union(*(self._memo_peer[pk].pods for pk in groups))
        return clauses + self._named_egress(base, rule.ports, pods, _NO_RANGES)

    def _named_egress(
        self, base: str, ports: tuple[PortSpec, ...], peers: Iterable[str], already: frozenset[PortRange]
    ) -> list[ClauseSpec]:
        """Named ports of an egress rule resolve on each destination pod: group destinations."""
        by_ports: dict[frozenset[PortRange], set[str]] = defaultdict(set)
        for p in peers:
            pod = self.pods[p]
            if pod.ip:
                ranges = _resolve(ports, pod) - already
                if ranges:
                    by_ports[ranges].add(pod.ip)
        return [
            ClauseSpec(f"{base}|named|{_sig(r)}", False, None, (), frozenset(ips), r)
            for r, ips in by_ports.items()
        ]


_NO_RANGES: frozenset[PortRange] = frozenset()


def _pop(index: dict[_K, dict[str, bool]], key: _K, value: str) -> None:
    values = index.get(key)
    if values is not None:
        values.pop(value, None)
        if not values:
            del index[key]


def _discard(index: dict[_K, set[_V]], key: _K, value: _V) -> None:
    """Remove ``value`` from ``index[key]``, and the key once its set is empty."""
    values = index.get(key)
    if values is not None:
        values.discard(value)
        if not values:
            del index[key]


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


@functools.lru_cache(maxsize=4096)
def _block_addresses(block: IPBlock) -> frozenset[str]:
    """An ipBlock as the addresses flows match: disjoint CIDRs, a /32 as its bare address."""
    return frozenset(str(n.network_address) if n.prefixlen == 32 else str(n) for n in block.networks())


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


@functools.lru_cache(maxsize=65536)
def _sig(ports: frozenset[PortRange]) -> str:
    return ",".join(f"{p}:{a}-{b}" for p, a, b in sorted(ports))
