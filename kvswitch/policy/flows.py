"""This node's policy flows: conjunctive matches, so a clause with N targets, M peers and P ports
costs N + M + P flows, never N x M x P.

EGRESS (at the source's node) and INGRESS (at the destination's node) only ever see the first
packet of a connection: established and related packets skip them (see CT_STATE), and OUTPUT
commits every new connection that got through.

Flows are assembled from contributions: each clause (and each policy's isolation of its local
targets) contributes a fragment to a set of flow keys, and a flow's actions are derived from all
the fragments on its key (a conjunction dimension lists every clause it takes part in).
:func:`policy_flows` builds the full set clause by clause from a :class:`PolicyResult` (the
reference); :class:`NodePolicyFlows` keeps it per event, with shared group contributions.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, cast

from kvswitch.ovs.flows import Flow, FlowKey
from kvswitch.ovs.pipeline import (
    EGRESS_RULE,
    INGRESS_RULE,
    L4_PROTO,
    PRIO_POLICY_ALLOW,
    PRIO_POLICY_CONJ,
    PRIO_POLICY_ISOLATED,
    PRIO_POLICY_METRIC,
    REG_OUT_PORT,
    Category,
    Owner,
    Table,
    audit_action,
    goto,
    output,
)
from kvswitch.policy.compute import (
    ANY_ADDRESS,
    Clause,
    ClauseSpec,
    GroupKey,
    PeerKey,
    PolicyResult,
    PolicyState,
    PortRange,
    paused_gc,
)
from kvswitch.policy.model import PodInfo

PROTO = L4_PROTO
BUCKETS = 1024  # policy flows are split over this many owners, so a change re-diffs only its buckets
ISOLATION = "|isolation"  # contributor suffix: a policy's drop flows for the local pods it isolates


class RuleClause(Protocol):
    @property
    def key(self) -> str: ...
    @property
    def ingress(self) -> bool: ...


def rule_name(policy: str, ingress: bool, index: int) -> str:
    """A rule's name: ``namespace/policy|in|0`` (its clauses' keys start with it)."""
    return f"{policy}|{'in' if ingress else 'out'}|{index}"


def rule_key(clause_key: str) -> str:
    """The rule a clause comes from (a rule with several port groups has several clauses)."""
    return "|".join(clause_key.split("|", 3)[:3])


@functools.lru_cache(maxsize=1 << 16)
def rule_id(rule: str) -> int:
    """A rule's 64-bit id, as its connections carry it in ct_label: a hash of its name, so every
    agent, every restart and the CLI agree on it without a table (64 bits: no two rules of a
    cluster share one in practice)."""
    return int.from_bytes(hashlib.blake2b(rule.encode(), digest_size=8).digest(), "big") or 1


def allow_actions(clause: RuleClause, logged: bool = False) -> str:
    """What a flow admitting ``clause``'s traffic does: the one place these actions are built.
    The rule's id goes into registers (OUTPUT commits it into ct_label, for the rule's counters),
    and for a ``logged`` policy a copy of the packet goes to the audit log."""
    return _allow_actions(clause.key, clause.ingress, logged)


@functools.lru_cache(maxsize=1 << 16)
def _allow_actions(key: str, ingress: bool, logged: bool) -> str:
    rule = rule_id(rule_key(key))
    audit = f"{audit_action(True, ingress, rule)}," if logged else ""
    load = (INGRESS_RULE if ingress else EGRESS_RULE).load(rule)
    return f"{audit}{load},{goto(Table.OUTPUT if ingress else Table.L3_FORWARD)}"


def deny_actions(ingress: bool, logged: bool) -> str:
    """What an isolated pod's default drop does: nothing, or copy the packet to the audit log."""
    return audit_action(False, ingress) if logged else "drop"


@functools.lru_cache(maxsize=1 << 16)
def metric_flows(clause_key: str, ingress: bool) -> tuple[tuple[FlowKey, str], tuple[FlowKey, str]]:
    """The two counter flows of the rule of a clause: its new connections (the rule is in the
    registers; OUTPUT's commit leaves the packet untracked, so no ct_state) and every later packet
    of them, both ways (ct_label)."""
    rule = rule_id(rule_key(clause_key))
    if ingress:
        field, table, then = INGRESS_RULE, int(Table.INGRESS_METRIC), output(REG_OUT_PORT)
    else:
        field, table, then = EGRESS_RULE, int(Table.EGRESS_METRIC), goto(Table.INGRESS_METRIC)
    return (
        ((table, PRIO_POLICY_METRIC, f"ip,{field.match(rule)}"), then),
        ((table, PRIO_POLICY_METRIC, f"ct_state=-new+trk,{field.label_match(rule)},ip"), then),
    )


def bucket_owner(bucket: int) -> Owner:
    return Owner(Category.POLICY, f"rules-{bucket:04d}")


def flow_bucket(key: FlowKey) -> int:
    return zlib.crc32(key[2].encode()) % BUCKETS


class ConjIds:
    """Stable conjunction ids: a clause keeps its id while it exists, so unrelated edits move nothing."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._free: list[int] = []
        self._next = 1

    def copy(self) -> ConjIds:
        other = ConjIds()
        other._ids, other._free, other._next = dict(self._ids), list(self._free), self._next
        return other

    def assign(self, keys: Iterable[str]) -> dict[str, int]:
        keys = set(keys)
        for gone in set(self._ids) - keys:
            self.release(gone)
        self.allocate(keys - set(self._ids))
        return {k: self._ids[k] for k in keys}

    def release(self, key: str) -> None:
        cid = self._ids.pop(key, None)
        if cid is not None:
            self._free.append(cid)

    def allocate(self, keys: Iterable[str]) -> None:
        for k in sorted(keys):
            if k in self._ids:
                continue
            if self._free:
                self._ids[k] = self._free.pop()
            else:
                self._ids[k] = self._next
                self._next += 1

    def __getitem__(self, key: str) -> int:
        return self._ids[key]

    def __len__(self) -> int:
        return len(self._ids)


def port_matches(ports: frozenset[PortRange]) -> list[str]:
    out = []
    for proto, lo, hi in sorted(ports):
        p = PROTO[proto]
        if (lo, hi) == (0, 65535):
            out.append(p)
        else:
            out.extend(f"{p},tp_dst={m}" for m in range_masks(lo, hi))
    return out


def range_masks(lo: int, hi: int) -> list[str]:
    """Cover [lo, hi] with value/mask pairs (OVS matches transport ports by mask)."""
    out = []
    while lo <= hi:
        size = 1
        while lo % (size * 2) == 0 and lo + size * 2 - 1 <= hi and size < 65536:
            size *= 2
        out.append(str(lo) if size == 1 else f"{lo:#x}/{(0xFFFF & ~(size - 1)):#x}")
        lo += size
    return out


_port_match_set: dict[frozenset[PortRange], frozenset[str]] = {}


def _port_matches(ports: frozenset[PortRange]) -> frozenset[str]:
    hit = _port_match_set.get(ports)
    if hit is None:
        if len(_port_match_set) > 65536:
            _port_match_set.clear()
        hit = _port_match_set[ports] = frozenset(port_matches(ports))
    return hit


def peer_match(address: str, field: str) -> str:
    """A peer address (pod IP, CIDR; a /32 comes as its bare address) as a match."""
    return "ip" if address == ANY_ADDRESS else f"ip,{field}={address}"


_conj_fragments: dict[tuple[int, int, int], str] = {}


def _conj_fragment(cid: int, k: int, n: int) -> str:
    hit = _conj_fragments.get((cid, k, n))
    if hit is None:
        if len(_conj_fragments) > 1 << 20:
            _conj_fragments.clear()
        hit = _conj_fragments[(cid, k, n)] = f"conjunction({cid},{k}/{n})"
    return hit


def _dim_match(value: str, field: str) -> str:
    """A dimension's value as a match: an address on ``field``, or (no field) a port match."""
    return peer_match(value, field) if field else value


def _isolation_key(ingress: bool, ip: str) -> FlowKey:
    if ingress:
        return (int(Table.INGRESS), PRIO_POLICY_ISOLATED, f"ip,nw_dst={ip}")
    return (int(Table.EGRESS), PRIO_POLICY_ISOLATED, f"ip,nw_src={ip}")


# A contribution: a fragment (one clause's), or a group's users (contributor → fragment), shared by
# every flow key of the group's members.
Contribution = str | dict[str, str]


def _finish(key: FlowKey, contributions: Mapping[object, Contribution], joined: dict[int, str]) -> Flow:
    """The flow on ``key`` from its contributions: a conjunction dimension lists every fragment (in
    order); any other key takes the fragment of the least contributor (identical keys from two
    clauses collapse onto one). ``joined`` memoises a group's joined fragments for one update."""
    table, priority, match = key
    if priority == PRIO_POLICY_CONJ and not match.startswith("conj_id="):
        if len(contributions) == 1:
            (only,) = contributions.values()
            if isinstance(only, str):
                actions = only
            else:
                actions = joined.get(id(only)) or joined.setdefault(
                    id(only), ",".join(sorted(set(only.values())))
                )
        else:
            fragments: set[str] = set()
            for c in contributions.values():
                if isinstance(c, str):
                    fragments.add(c)
                else:
                    fragments.update(c.values())
            actions = ",".join(sorted(fragments))
    elif priority == PRIO_POLICY_ISOLATED and table in _POLICY_TABLES:
        # an isolated pod's drop: logged when any policy isolating it is ("controller(" < "drop")
        actions = min(
            fragment
            for c in contributions.values()
            for fragment in ((c,) if isinstance(c, str) else c.values())
        )
    else:
        best: tuple[str, str] | None = None
        for who, c in contributions.items():
            for pair in ((str(who), c),) if isinstance(c, str) else c.items():
                if best is None or pair[0] < best[0]:
                    best = pair
        assert best is not None
        actions = best[1]
    return Flow.model_construct(table=table, priority=priority, match=match, actions=actions, cookie=0)


_POLICY_TABLES = (int(Table.INGRESS), int(Table.EGRESS))


def _is_conj(clause: Clause) -> bool:
    return clause.peers is not None or clause.ports is not None


def _clause_contributions(
    clause: Clause, cid: int, ips: frozenset[str], logged: bool = False
) -> Iterator[tuple[FlowKey, str]]:
    """Every (flow key, fragment) one clause contributes, its local targets being ``ips``."""
    table = int(Table.INGRESS if clause.ingress else Table.EGRESS)
    target_field, peer_field = ("nw_dst", "nw_src") if clause.ingress else ("nw_src", "nw_dst")
    yield from metric_flows(clause.key, clause.ingress)
    if not cid:
        for ip in ips:
            yield (table, PRIO_POLICY_ALLOW, f"ip,{target_field}={ip}"), allow_actions(clause, logged)
        return
    yield (table, PRIO_POLICY_CONJ, f"conj_id={cid},ip"), allow_actions(clause, logged)
    dims: list[tuple[Iterable[str], str]] = [(ips, target_field)]
    if clause.peers is not None:
        dims.append((clause.peers, peer_field))
    if clause.ports is not None:
        dims.append((port_matches(clause.ports), ""))
    for k, (values, field) in enumerate(dims, 1):
        fragment = f"conjunction({cid},{k}/{len(dims)})"
        for v in values:
            yield (table, PRIO_POLICY_CONJ, _dim_match(v, field)), fragment


def _local_ips(clause: Clause, local: Mapping[str, str]) -> frozenset[str]:
    if len(clause.targets) < len(local):
        return frozenset(ip for t in clause.targets if (ip := local.get(t)))
    return frozenset(ip for t, ip in local.items() if t in clause.targets)


def policy_flows(result: PolicyResult, local_pods: Iterable[PodInfo], ids: ConjIds) -> list[Flow]:
    """Isolation and rule flows for the pods of this node (table defaults are in node_flows), from
    scratch, clause by clause: the reference the incremental :class:`NodePolicyFlows` must equal."""
    local = {p.key: p.ip for p in local_pods if p.ip is not None}
    contrib: dict[FlowKey, dict[object, Contribution]] = defaultdict(dict)
    for ingress, isolated, audited in (
        (False, result.egress_isolated, result.audited_egress),
        (True, result.ingress_isolated, result.audited_ingress),
    ):
        for pod in isolated & local.keys():
            fragment = deny_actions(ingress, pod in audited)
            contrib[_isolation_key(ingress, local[pod])][pod + ISOLATION] = fragment
    relevant = [(c, ips) for c in result.clauses if (ips := _local_ips(c, local))]
    conj = ids.assign(c.key for c, _ in relevant if _is_conj(c))
    for clause, ips in relevant:
        logged = clause.key.partition("|")[0] in result.logged
        for fk, fragment in _clause_contributions(clause, conj.get(clause.key, 0), ips, logged):
            contrib[fk][clause.key] = fragment
    joined: dict[int, str] = {}
    return [_finish(k, v, joined) for k, v in sorted(contrib.items())]


# --- incremental ----------------------------------------------------------------------------------

# A group view: the members of a target group (their local IPs) or of a peer set (their IPs), as
# one dimension's matches: (kind "T"/"P", group, table, priority, match field).
ViewId = tuple[str, object, int, int, str]


class _View:
    __slots__ = ("users", "values")

    def __init__(self, values: frozenset[str]) -> None:
        self.users: dict[str, str] = {}  # clause (or policy isolation) → fragment
        self.values = values


class _Rendered:
    """A clause as this node renders it. Its conjunction id (0: a plain allow, neither peers nor
    ports), per dimension (targets, peers, ports) the priority, match field ("" for port
    matches), fragment and the values it contributes itself, and the group views it uses."""

    __slots__ = ("clause", "dims", "direct", "logged", "shape", "table", "targets", "views")
    clause: ClauseSpec
    logged: bool
    targets: frozenset[str] | None  # local IPs of the listed targets (None: the target group's)
    table: int
    shape: tuple[int, int, str, bool, bool, bool]
    dims: tuple[tuple[int, str, str], ...]
    direct: tuple[frozenset[str], ...]
    views: frozenset[tuple[ViewId, str]]

    def __init__(
        self,
        clause: ClauseSpec,
        cid: int,
        group: GroupKey,
        targets: frozenset[str] | None,
        like: _Rendered | None = None,
        logged: bool = False,
    ) -> None:
        self.clause, self.targets, self.logged = clause, targets, logged
        self.table = table = int(Table.INGRESS if clause.ingress else Table.EGRESS)
        allow = allow_actions(clause, logged)
        shape = (table, cid, allow, clause.any_peer, clause.ports is None, targets is None)
        if like is not None and like.shape == shape:  # a clause re-rendered: its dimensions stay
            self.shape, dims = like.shape, like.dims
        else:
            target_field, peer_field = ("nw_dst", "nw_src") if clause.ingress else ("nw_src", "nw_dst")
            fields = [target_field]
            if cid:
                if not clause.any_peer:
                    fields.append(peer_field)
                if clause.ports is not None:
                    fields.append("")
                n = len(fields)
                dims = tuple(
                    (PRIO_POLICY_CONJ, f, _conj_fragment(cid, k, n)) for k, f in enumerate(fields, 1)
                )
            else:
                dims = ((PRIO_POLICY_ALLOW, target_field, allow),)
            self.shape = shape
        self.dims = dims
        direct = [_NO_IPS if targets is None else targets]
        views: list[tuple[ViewId, str]] = []
        if targets is None:
            prio, field, fragment = dims[0]
            views.append((("T", group, table, prio, field), fragment))
        if cid:
            k = 1
            if not clause.any_peer:
                prio, field, fragment = dims[k]
                direct.append(clause.peers or _NO_IPS)
                views.extend((("P", pk, table, prio, field), fragment) for pk in clause.peer_groups)
                k += 1
            if clause.ports is not None:
                direct.append(_port_matches(clause.ports))
        self.direct = tuple(direct)
        self.views = frozenset(views)

    @property
    def cid(self) -> int:
        return self.shape[1]


@dataclass(slots=True)
class _Tracked:
    """A policy of a local namespace as last rendered here: its target group, whether the group has
    local members, its clauses (with the local IPs of listed targets) when it has."""

    group: GroupKey | None
    active: bool
    clauses: dict[str, tuple[ClauseSpec, frozenset[str] | None]]
    isolation: frozenset[tuple[ViewId, str]]
    conj: frozenset[str]  # keys of the clauses with a conjunction id
    logged: bool = False  # the policy's decisions go to the audit log


_NO_IPS: frozenset[str] = frozenset()
_UNTRACKED = _Tracked(None, False, {}, frozenset(), frozenset())


class NodePolicyFlows:
    """This node's policy flows, kept up to date per batch of events, like address groups: a flow
    key of a target group's or peer set's member takes the group's fragments as one shared
    contribution, so a membership change touches the keys of the members that came and went,
    whatever the number of policies using the group. Re-rendered, clause by clause and dimension
    by dimension against what they contributed before, are only the policies the state reports
    changed (:meth:`PolicyState.take_changes`), those whose group gained its first or lost its
    last local member, and those of namespaces whose local pods changed. The flows on touched keys
    are rebuilt and their owner buckets marked for the reconciler."""

    def __init__(self, state: PolicyState) -> None:
        self.state = state
        self.ids = ConjIds()
        self._local: dict[str, str] = {}  # local pod key → IP (pods with an IP only)
        self._local_ns: dict[str, set[str]] = defaultdict(set)  # namespace → local pod keys
        self._tracked: dict[str, _Tracked] = {}  # policy key → as rendered
        self._rendered: dict[str, _Rendered] = {}  # clause key → as rendered
        self._tvals: dict[GroupKey, frozenset[str]] = {}  # target group → local members' IPs
        self._trefs: dict[GroupKey, set[str]] = defaultdict(set)  # target group → policy keys
        self._views: dict[ViewId, _View] = {}
        self._views_of: dict[tuple[str, object], set[ViewId]] = defaultdict(set)
        self._contrib: dict[FlowKey, dict[object, Contribution]] = {}
        self._users_changed: set[ViewId] = set()
        self._buckets: list[dict[FlowKey, Flow]] = [{} for _ in range(BUCKETS)]
        self._pending: set[int] = set(range(BUCKETS))  # buckets not confirmed installed
        self._touched: set[FlowKey] = set()
        self._rule_names: dict[int, str] | None = None  # rules(), until the next update
        # (id(before), id(after)) → (before, after, gone, came): the operands stay referenced, so
        # their ids are not reused while the memo lives (one update).
        self._diffs: dict[tuple[int, int], tuple[object, object, frozenset[str], frozenset[str]]] = {}

    # --- output ---------------------------------------------------------------------------

    def flows(self) -> list[Flow]:
        return [f for b in self._buckets for f in b.values()]

    def pending(self) -> dict[Owner, list[Flow]]:
        """The desired flows of every bucket changed since :meth:`confirm` was last called."""
        return {bucket_owner(b): list(self._buckets[b].values()) for b in sorted(self._pending)}

    def confirm(self) -> None:
        """What :meth:`pending` returned is installed."""
        self._pending.clear()

    # --- names for statistics and the audit log ---------------------------------------------

    def rules(self) -> dict[int, str]:
        """Rule id → rule name, for every rule with flows on this node."""
        if self._rule_names is None:
            self._rule_names = {rule_id(r): r for r in {rule_key(ck) for ck in self._rendered}}
        return self._rule_names

    def audited_policies(self, ip: str, ingress: bool) -> list[str]:
        """The logged policies that isolate local pod ``ip`` in that direction."""
        table = int(Table.INGRESS if ingress else Table.EGRESS)
        return sorted(
            key
            for key, t in self._tracked.items()
            if t.logged
            and t.group is not None
            and ip in self._tvals.get(t.group, _NO_IPS)
            and any(vid[2] == table for vid, _ in t.isolation)
        )

    # --- update ---------------------------------------------------------------------------

    def update(self, local_pods: Iterable[PodInfo]) -> int:
        """Bring the flows up to date with the state's events and this node's pods; the number of
        flow keys whose flow changed."""
        with paused_gc():
            return self._update(local_pods)

    def _update(self, local_pods: Iterable[PodInfo]) -> int:
        self._rule_names = None
        local = {p.key: (p.namespace, p.ip) for p in local_pods if p.ip}
        changed_ns: set[str] = set()
        for key in self._local.keys() | local.keys():
            now = local.get(key)
            if now is None or self._local.get(key) != now[1]:
                ns = now[0] if now is not None else key.partition("/")[0]
                changed_ns.add(ns)
                if now is None:
                    del self._local[key]
                    self._local_ns[ns].discard(key)
                    if not self._local_ns[ns]:
                        del self._local_ns[ns]
                else:
                    self._local[key] = now[1]
                    self._local_ns[ns].add(key)
        todo, groups, peers = self.state.take_changes()
        # Group members first: the views follow, policies only when a group's locality flips.
        for group in [g for g in self._trefs if g in groups or g[1] in changed_ns]:
            before = self._tvals.get(group, _NO_IPS)
            after = self._target_values(group)
            if after != before:
                self._tvals[group] = after
                for vid in self._views_of.get(("T", group), ()):
                    self._set_values(vid, after)
                if bool(after) != bool(before):
                    todo |= self._trefs[group]
        for pk in peers:
            vids = self._views_of.get(("P", pk))
            ips = self.state.peer_ips(pk) if vids else None
            if vids and ips is not None:
                for vid in list(vids):
                    self._set_values(vid, ips)
        for ns in changed_ns:
            todo |= self.state.policies_in(ns)  # (a removed policy is among the changed ones)
        todo = {k for k in todo if k in self._tracked or k.partition("/")[0] in self._local_ns}
        plans: list[tuple[str, _Tracked, _Tracked]] = []
        released: set[str] = set()
        wanted: set[str] = set()
        for key in todo:
            old = self._tracked.get(key, _UNTRACKED)
            new = self._plan(key)
            plans.append((key, old, new))
            if old.group != new.group:  # (a group's local IPs are kept while a policy refers to it)
                if new.group is not None:
                    self._trefs[new.group].add(key)
                if old.group is not None:
                    _drop_ref(self._trefs, self._tvals, old.group, key)
            if old.conj != new.conj:
                released |= old.conj - new.conj
                wanted |= new.conj - old.conj
        for k in released - wanted:
            self.ids.release(k)
        self.ids.allocate(wanted)
        for key, old, new in plans:
            self._render_policy(key, old, new)
            if new.group is not None:
                self._tracked[key] = new
            else:
                self._tracked.pop(key, None)
                if key.partition("/")[0] not in self._local_ns:
                    self.state.forget(key)  # no pod here any more: stop keeping its selections
        for vid in self._users_changed:
            view = self._views.get(vid)
            if view is not None:
                self._touched.update(_view_key(vid, v) for v in view.values)
        self._users_changed.clear()
        self._diffs.clear()
        return self._finish_touched()

    def _target_values(self, group: GroupKey) -> frozenset[str]:
        mine = self._local_ns.get(group[1])
        if not mine:
            return _NO_IPS
        members = self.state.group_members(group)
        return frozenset(self._local[k] for k in mine if k in members)

    def _plan(self, key: str) -> _Tracked:
        mine = self._local_ns.get(key.partition("/")[0])
        entry = self.state.entry(key) if mine else None
        if entry is None:
            return _UNTRACKED
        assert mine is not None
        group = entry.target_group
        ips = self._tvals.get(group)
        if ips is None:
            ips = self._tvals[group] = self._target_values(group)
        logged = entry.policy.log
        if not ips:
            return _Tracked(group, False, {}, frozenset(), frozenset(), logged)
        clauses: dict[str, tuple[ClauseSpec, frozenset[str] | None]] = {}
        conj = []
        for c in entry.clauses:
            listed = None if c.targets is None else frozenset(self._local[k] for k in mine if k in c.targets)
            if listed is None or listed:
                clauses[c.key] = (c, listed)
                if not c.any_peer or c.ports is not None:
                    conj.append(c.key)
        table = int(Table.INGRESS), int(Table.EGRESS)
        isolation = []
        if entry.policy.ingress is not None:
            isolation.append(
                (("T", group, table[0], PRIO_POLICY_ISOLATED, "nw_dst"), deny_actions(True, logged))
            )
        if entry.policy.egress is not None:
            isolation.append(
                (("T", group, table[1], PRIO_POLICY_ISOLATED, "nw_src"), deny_actions(False, logged))
            )
        return _Tracked(group, True, clauses, frozenset(isolation), frozenset(conj), logged)

    def _render_policy(self, key: str, old: _Tracked, new: _Tracked) -> None:
        if old.isolation != new.isolation:
            who = key + ISOLATION
            for vid, _ in old.isolation - new.isolation:
                self._unuse(vid, who)
            for vid, fragment in new.isolation - old.isolation:
                self._use(vid, who, fragment)
        if old.clauses.keys() != new.clauses.keys():
            for ck in old.clauses.keys() - new.clauses.keys():
                self._render_clause(ck, self._rendered.pop(ck), None)
        rendered = self._rendered
        ids = self.ids
        assert new.group is not None or not new.clauses
        for ck, (clause, listed) in new.clauses.items():
            prev = rendered.get(ck)
            cid = ids[ck] if not clause.any_peer or clause.ports is not None else 0
            if (
                prev is not None
                and prev.clause is clause
                and prev.targets == listed
                and prev.cid == cid
                and prev.logged == new.logged
            ):
                continue
            assert new.group is not None
            now = rendered[ck] = _Rendered(clause, cid, new.group, listed, prev, new.logged)
            self._render_clause(ck, prev, now)

    def _render_clause(self, ck: str, old: _Rendered | None, new: _Rendered | None) -> None:
        if old is not None and new is not None and old.shape == new.shape:
            table = new.table
            for (prio, field, fragment), before, after in zip(new.dims, old.direct, new.direct, strict=True):
                if before is after:
                    continue
                gone, came = self._diff(before, after)
                for v in gone:
                    self._retract((table, prio, _dim_match(v, field)), ck)
                for v in came:
                    self._add((table, prio, _dim_match(v, field)), ck, fragment)
            if old.views != new.views:
                for vid, _ in old.views - new.views:
                    self._unuse(vid, ck)
                for vid, fragment in new.views - old.views:
                    self._use(vid, ck, fragment)
            return
        if old is not None:
            table = old.table
            for fk, _ in metric_flows(ck, old.clause.ingress):
                self._retract(fk, ck)
            if old.cid:
                self._retract((table, PRIO_POLICY_CONJ, f"conj_id={old.cid},ip"), ck)
            for (prio, field, _), values in zip(old.dims, old.direct, strict=True):
                for v in values:
                    self._retract((table, prio, _dim_match(v, field)), ck)
            for vid, _ in old.views:
                self._unuse(vid, ck)
        if new is not None:
            table = new.table
            for fk, fragment in metric_flows(ck, new.clause.ingress):
                self._add(fk, ck, fragment)
            if new.cid:
                self._add((table, PRIO_POLICY_CONJ, f"conj_id={new.cid},ip"), ck, new.shape[2])
            for (prio, field, fragment), values in zip(new.dims, new.direct, strict=True):
                for v in values:
                    self._add((table, prio, _dim_match(v, field)), ck, fragment)
            for vid, fragment in new.views:
                self._use(vid, ck, fragment)

    def _diff(self, before: frozenset[str], after: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
        """What left and what came; shared sets are diffed once per update."""
        memo_key = (id(before), id(after))
        hit = self._diffs.get(memo_key)
        if hit is None:
            hit = self._diffs[memo_key] = (before, after, before - after, after - before)
        return hit[2], hit[3]

    # --- group views ----------------------------------------------------------------------

    def _use(self, vid: ViewId, who: str, fragment: str) -> None:
        view = self._views.get(vid)
        if view is None:
            if vid[0] == "T":
                values = self._tvals.get(cast(GroupKey, vid[1]), _NO_IPS)
            else:
                values = self.state.peer_ips(cast(PeerKey, vid[1])) or _NO_IPS
            view = self._views[vid] = _View(values)
            self._views_of[(vid[0], vid[1])].add(vid)
            for v in values:
                self._add(_view_key(vid, v), vid, view.users)
        if view.users.get(who) != fragment:
            view.users[who] = fragment
            self._users_changed.add(vid)

    def _unuse(self, vid: ViewId, who: str) -> None:
        view = self._views.get(vid)
        if view is None or view.users.pop(who, None) is None:
            return
        self._users_changed.add(vid)
        if not view.users:
            for v in view.values:
                self._retract(_view_key(vid, v), vid)
            del self._views[vid]
            _discard_view(self._views_of, (vid[0], vid[1]), vid)

    def _set_values(self, vid: ViewId, values: frozenset[str]) -> None:
        view = self._views[vid]
        if view.values is values:
            return
        gone, came = self._diff(view.values, values)
        for v in gone:
            self._retract(_view_key(vid, v), vid)
        for v in came:
            self._add(_view_key(vid, v), vid, view.users)
        view.values = values

    # --- contributions and flows ----------------------------------------------------------

    def _add(self, key: FlowKey, who: object, contribution: Contribution) -> None:
        contribs = self._contrib.get(key)
        if contribs is None:
            contribs = self._contrib[key] = {}
        contribs[who] = contribution
        self._touched.add(key)

    def _retract(self, key: FlowKey, who: object) -> None:
        contribs = self._contrib.get(key)
        if contribs is not None and contribs.pop(who, None) is not None:
            if not contribs:
                del self._contrib[key]
            self._touched.add(key)

    def _finish_touched(self) -> int:
        changed = 0
        joined: dict[int, str] = {}
        for key in self._touched:
            b = flow_bucket(key)
            bucket = self._buckets[b]
            contribs = self._contrib.get(key)
            before = bucket.get(key)
            if contribs is None:
                if before is not None:
                    del bucket[key]
                    changed += 1
                    self._pending.add(b)
                continue
            flow = _finish(key, contribs, joined)
            if before is None or before.actions != flow.actions:
                bucket[key] = flow
                changed += 1
                self._pending.add(b)
        self._touched.clear()
        return changed


def _view_key(vid: ViewId, value: str) -> FlowKey:
    return (vid[2], vid[3], peer_match(value, vid[4]))


def _discard_view(index: dict[tuple[str, object], set[ViewId]], key: tuple[str, object], vid: ViewId) -> None:
    vids = index.get(key)
    if vids is not None:
        vids.discard(vid)
        if not vids:
            del index[key]


def _drop_ref(
    refs: dict[GroupKey, set[str]], values: dict[GroupKey, frozenset[str]], group: GroupKey, key: str
) -> None:
    keys = refs.get(group)
    if keys is not None:
        keys.discard(key)
        if not keys:
            del refs[group]
            values.pop(group, None)
