"""This node's policy flows: conjunctive matches, so a clause with N targets, M peers and P ports
costs N + M + P flows, never N x M x P.

EGRESS (at the source's node) and INGRESS (at the destination's node) only ever see the first
packet of a connection: established and related packets skip them (see CT_STATE), and OUTPUT
commits every new connection that got through.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import defaultdict
from collections.abc import Iterable

from kvswitch.ovs.flows import Flow
from kvswitch.ovs.pipeline import (
    L4_PROTO,
    PRIO_POLICY_ALLOW,
    PRIO_POLICY_CONJ,
    PRIO_POLICY_ISOLATED,
    Table,
    goto,
)
from kvswitch.policy.compute import PolicyResult, PortRange
from kvswitch.policy.model import PodInfo

PROTO = L4_PROTO


class ConjIds:
    """Stable conjunction ids: a clause keeps its id while it exists, so unrelated edits move nothing."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._free: list[int] = []
        self._next = 1

    def assign(self, keys: Iterable[str]) -> dict[str, int]:
        keys = set(keys)
        for gone in set(self._ids) - keys:
            self._free.append(self._ids.pop(gone))
        for k in sorted(keys - set(self._ids)):
            if self._free:
                self._ids[k] = self._free.pop()
            else:
                self._ids[k] = self._next
                self._next += 1
        return {k: self._ids[k] for k in keys}


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


@functools.lru_cache(maxsize=65536)
def _addr(value: str) -> str | None:
    """OVS match value for an IP or CIDR; None for 0.0.0.0/0 (matches without a field)."""
    if "/" not in value:
        return value  # a pod IP: the hot path, 100k of them per recompute at scale
    net = ipaddress.IPv4Network(value, strict=False)
    if net.prefixlen == 0:
        return None
    return str(net.network_address) if net.prefixlen == 32 else str(net)


def policy_flows(result: PolicyResult, local_pods: Iterable[PodInfo], ids: ConjIds) -> list[Flow]:
    """Isolation and rule flows for the pods of this node (table defaults are in node_flows)."""
    local = {p.key: p for p in local_pods if p.ip}
    flows: list[Flow] = []
    for key in sorted(result.egress_isolated & local.keys()):
        match = f"ip,nw_src={local[key].ip}"
        flows.append(Flow(table=Table.EGRESS, priority=PRIO_POLICY_ISOLATED, match=match, actions="drop"))
    for key in sorted(result.ingress_isolated & local.keys()):
        match = f"ip,nw_dst={local[key].ip}"
        flows.append(Flow(table=Table.INGRESS, priority=PRIO_POLICY_ISOLATED, match=match, actions="drop"))

    relevant = [c for c in result.clauses if c.targets & local.keys()]
    conj = ids.assign(c.key for c in relevant if c.peers is not None or c.ports is not None)
    dims: dict[tuple[Table, str], list[str]] = defaultdict(list)  # (table, match) -> conjunction actions
    for clause in relevant:
        table = Table.INGRESS if clause.ingress else Table.EGRESS
        allow = goto(Table.OUTPUT if clause.ingress else Table.L3_FORWARD)
        target_field, peer_field = ("nw_dst", "nw_src") if clause.ingress else ("nw_src", "nw_dst")
        target_matches = [f"ip,{target_field}={local[t].ip}" for t in sorted(clause.targets & local.keys())]
        if clause.peers is None and clause.ports is None:
            flows.extend(
                Flow(table=table, priority=PRIO_POLICY_ALLOW, match=m, actions=allow) for m in target_matches
            )
            continue
        dimensions = [target_matches]
        if clause.peers is not None:
            peer_matches = []
            for peer in sorted(clause.peers):
                addr = _addr(peer)
                peer_matches.append("ip" if addr is None else f"ip,{peer_field}={addr}")
            dimensions.append(peer_matches)
        if clause.ports is not None:
            dimensions.append(port_matches(clause.ports))
        cid = conj[clause.key]
        n = len(dimensions)
        for k, matches in enumerate(dimensions, start=1):
            for m in matches:
                dims[(table, m)].append(f"conjunction({cid},{k}/{n})")
        flows.append(Flow(table=table, priority=PRIO_POLICY_CONJ, match=f"conj_id={cid},ip", actions=allow))
    for (table, match), actions in sorted(dims.items()):
        conjunctions = ",".join(sorted(set(actions)))
        flows.append(Flow(table=table, priority=PRIO_POLICY_CONJ, match=match, actions=conjunctions))
    return _dedupe(flows)


def _dedupe(flows: list[Flow]) -> list[Flow]:
    """A plain allow and a conjunction dimension may share a match only at different priorities;
    identical keys (the same allow from two clauses) collapse."""
    seen: dict[tuple[int, int, str], Flow] = {}
    for f in flows:
        seen.setdefault(f.key, f)
    return list(seen.values())
