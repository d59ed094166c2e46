"""The OpenFlow service proxy: one Service → select groups and flows for this node. Pure.

A new connection to a Service address (ClusterIP, externalIPs, load-balancer IPs, this node's
addresses on a NodePort) meets SERVICE_LB, which sends it to the Service port's select group; the
chosen bucket writes the endpoint into registers and resubmits to ENDPOINT_DNAT, which commits the
connection with ``nat(dst=endpoint)`` and continues at EGRESS, so NetworkPolicy sees the backend's
address and port. Later packets, and replies, are translated by ``ct(nat)`` in CONNTRACK.
Table-by-table description: docs/pipeline.md; docs/services.md for the semantics.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from kvswitch.ovs.flows import Flow
from kvswitch.ovs.groups import Group
from kvswitch.ovs.pipeline import (
    AFFINITY_HIT,
    L4_PROTO,
    NODEPORT_VIP,
    PRIO_SERVICE,
    PRIO_SERVICE_AFFINITY,
    REG_ENDPOINT_IP,
    REG_ENDPOINT_PORT,
    REG_SERVICE_GROUP,
    Table,
    ct_dnat_commit,
    goto,
    learn_affinity,
    reject_connection,
    resubmit,
)
from kvswitch.services.model import Endpoint, ServiceInfo, ServicePort, select_endpoints

PROTO = L4_PROTO
log = logging.getLogger(__name__)
BUCKET_WEIGHT = 100
MAX_BUCKETS = 1000  # ~64-byte buckets: OVS refuses a group message over 64 KiB (1,022 measured)


@dataclass(frozen=True, slots=True)
class NodeContext:
    """What the translation needs to know about this node."""

    name: str
    addresses: tuple[str, ...]  # where NodePorts answer: the node's overlay IP and gateway IP


GroupIds = Callable[[str], int]  # a stable group id for a key, allocated by the caller


def endpoints_for_port(port: ServicePort, slices: Iterable[tuple[str, str, Endpoint]]) -> list[Endpoint]:
    """The endpoints of one Service port: slice ports are matched by name and protocol."""
    return [ep for name, proto, ep in slices if name == port.name and proto == port.protocol]


def service_flows(
    svc: ServiceInfo,
    endpoints: Iterable[tuple[str, str, Endpoint]],
    node: NodeContext,
    group_ids: GroupIds,
) -> tuple[list[Flow], list[Group]]:
    """Flows and groups of one Service on this node (empty for headless/ExternalName)."""
    flows: list[Flow] = []
    groups: list[Group] = []
    eps = list(endpoints)
    for port in svc.ports:
        candidates = endpoints_for_port(port, eps)
        proto = PROTO[port.protocol]
        frontends_internal = [(ip, port.port) for ip in svc.cluster_ips]
        frontends_external = [(ip, port.port) for ip in svc.external_ips]
        if port.node_port is not None:
            # the node's own addresses (a pod reaching them), and where the host DNATs NodePorts
            addresses = (*node.addresses, NODEPORT_VIP)
            frontends_external += [(ip, port.node_port) for ip in addresses]
        # (selection sorts the endpoints: done once per scope that has frontends, shared when equal)
        internal = select_endpoints(candidates, node.name, svc.internal_local) if frontends_internal else []
        if not frontends_external:
            external = []
        elif svc.external_local == svc.internal_local and frontends_internal:
            external = internal
        else:
            external = select_endpoints(candidates, node.name, svc.external_local)
        for scope, selected, frontends in (
            ("cluster", internal, frontends_internal),
            ("external", external, frontends_external),
        ):
            if not frontends:
                continue
            key = f"{svc.key}/{port.protocol}/{port.port}/{scope}"
            if not selected:
                # kube-proxy rejects at once (TCP RST, ICMP port unreachable), never a timeout;
                # but drops what externalTrafficPolicy: Local keeps away from remote endpoints.
                local_only = scope == "external" and svc.external_local and bool(candidates)
                action = "drop" if local_only else reject_connection()
                flows.extend(_frontend(proto, ip, p, action) for ip, p in frontends)
                continue
            if proto == "sctp":
                selected, frontends = _sctp_ports(selected, frontends, flows)
            gid = group_ids(key)
            if len(selected) > MAX_BUCKETS:
                # an OpenFlow message is at most 64 KiB: OVS refuses a larger group (and the whole
                # bundle with it). The first MAX_BUCKETS endpoints serve; docs/services.md.
                log.warning("%s: %d endpoints, only %d used", key, len(selected), MAX_BUCKETS)
                selected = selected[:MAX_BUCKETS]
            regs = [_endpoint_regs(ep) for ep in selected]
            groups.append(_group(gid, [load for load, _ in regs]))
            enter = f"{REG_SERVICE_GROUP.load(gid)},group:{gid}"
            flows.extend(_frontend(proto, ip, p, enter) for ip, p in frontends)
            learn = (
                f"{learn_affinity(proto, svc.affinity_timeout)}," if svc.affinity_timeout is not None else ""
            )
            head = f"{proto},{REG_SERVICE_GROUP.match(gid)}"
            flows.extend(_dnat(head, ep, match, learn) for ep, (_, match) in zip(selected, regs, strict=True))
    return _dedupe(flows), groups


def _sctp_ports(
    selected: list[Endpoint], frontends: list[tuple[str, int]], flows: list[Flow]
) -> tuple[list[Endpoint], list[tuple[str, int]]]:
    """OVS's userspace conntrack before 3.3 translates an SCTP connection's address but not its
    port, so the port is rewritten statelessly around conntrack: to the endpoints' port before it,
    back to the Service's on replies after it. One port number per Service port, then: endpoints
    with another number (a named targetPort resolved differently) are left out. Correct on newer
    OVS too (its NAT then finds the port already right)."""
    target = Counter(e.port for e in selected).most_common(1)[0][0]
    for ip, port in frontends:
        if port == target:
            continue
        flows.append(
            Flow(
                table=Table.CONNTRACK,
                priority=PRIO_SERVICE,
                match=f"sctp,nw_dst={ip},tp_dst={port}",
                actions=f"set_field:{target}->sctp_dst,{goto(Table.CT_ZONE)}",
            )
        )
        flows.append(
            Flow(
                table=Table.CT_STATE,
                priority=PRIO_SERVICE,
                match=f"ct_state=+rpl+trk,sctp,nw_src={ip},tp_src={target}",
                actions=f"set_field:{port}->sctp_src,{goto(Table.EGRESS)}",
            )
        )
    return [e for e in selected if e.port == target], [(ip, target) for ip, _ in frontends]


# Built unvalidated (model_construct): the hot path of a full sync (110k flows for 10k Services);
# every field is produced here in its final type and syntax.
_SERVICE_LB, _ENDPOINT_DNAT = int(Table.SERVICE_LB), int(Table.ENDPOINT_DNAT)


def _frontend(proto: str, ip: str, port: int, actions: str) -> Flow:
    return Flow.model_construct(
        table=_SERVICE_LB,
        priority=PRIO_SERVICE,
        match=f"ct_state=+new+trk,{proto},nw_dst={ip},tp_dst={port}",
        actions=actions,
        cookie=0,
    )


def _endpoint_regs(ep: Endpoint) -> tuple[str, str]:
    """The endpoint in registers: (set_field actions for a bucket, match for ENDPOINT_DNAT).
    Built once per endpoint: a full sync of 10k Services names 100k of them."""
    ip = _ip_int(ep.ip)
    port_load, port_match = _port_regs(ep.port)
    return f"{REG_ENDPOINT_IP.load(ip)},{port_load}", f"{REG_ENDPOINT_IP.match(ip)},{port_match}"


@functools.cache
def _port_regs(port: int) -> tuple[str, str]:  # at most 65535 entries; endpoints share a few ports
    return REG_ENDPOINT_PORT.load(port), REG_ENDPOINT_PORT.match(port)


def _group(gid: int, loads: list[str]) -> Group:
    """A bucket is an OpenFlow *action set* (one action of a kind, no learn): it only names the
    endpoint; ENDPOINT_DNAT does the rest in an ordinary action list."""
    then = resubmit(Table.ENDPOINT_DNAT)
    buckets = tuple(
        f"bucket=bucket_id:{i},weight:{BUCKET_WEIGHT},actions={load},{then}" for i, load in enumerate(loads)
    )
    return Group(group_id=gid, type="select", selection_method="dp_hash", buckets=buckets)


def _dnat(head: str, ep: Endpoint, regs_match: str, learn: str) -> Flow:
    """``head``: protocol and the Service port's group; ``learn``: with session affinity, every new
    connection (re)learns client → endpoint (kube-proxy's ClientIP timeout counts from the client's
    last new connection)."""
    return Flow.model_construct(
        table=_ENDPOINT_DNAT,
        priority=PRIO_SERVICE,
        match=f"{head},{regs_match}",
        actions=learn + ct_dnat_commit(ep.ip, ep.port, then=Table.EGRESS),
        cookie=0,
    )


def affinity_flows() -> list[Flow]:
    """A connection that an affinity entry claimed skips the group (learned entries sit in
    SERVICE_AFFINITY and set AFFINITY_HIT)."""
    return [
        Flow(
            table=Table.SERVICE_LB,
            priority=PRIO_SERVICE_AFFINITY,
            match=f"ct_state=+new+trk,ip,{AFFINITY_HIT.match}",
            actions=resubmit(Table.ENDPOINT_DNAT),
        ),
        Flow(table=Table.SERVICE_AFFINITY, priority=0, actions=goto(Table.SERVICE_LB)),
    ]


def _ip_int(ip: str) -> int:
    return int.from_bytes(socket.inet_aton(ip), "big")  # ip is a dotted quad (parse_slice checked)


def _dedupe(flows: list[Flow]) -> list[Flow]:
    seen: dict[tuple[int, int, str], Flow] = {}
    for f in flows:
        seen.setdefault(f.key, f)
    return list(seen.values())


def all_service_flows(
    services: Mapping[str, ServiceInfo],
    slices: Mapping[str, list[tuple[str, str, Endpoint]]],
    node: NodeContext,
    group_ids: GroupIds,
) -> dict[str, tuple[list[Flow], list[Group]]]:
    """Every Service's flows and groups, by Service key (used by full syncs and tests)."""
    return {key: service_flows(svc, slices.get(key, []), node, group_ids) for key, svc in services.items()}
