"""The OpenFlow service proxy: one Service → select groups and flows for this node. Pure.

A new connection to a Service address (ClusterIP, externalIPs, load-balancer IPs, this node's
addresses on a NodePort) meets SERVICE_LB, which sends it to the Service port's select group; the
chosen bucket writes the endpoint into registers and resubmits to ENDPOINT_DNAT, which commits the
connection with ``nat(dst=endpoint)`` and continues at EGRESS, so NetworkPolicy sees the backend's
address and port. Later packets, and replies, are translated by ``ct(nat)`` in CONNTRACK.
Table-by-table description: docs/pipeline.md; docs/services.md for the semantics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from kvswitch.ovs.flows import Flow
from kvswitch.ovs.groups import Group
from kvswitch.ovs.pipeline import (
    AFFINITY_HIT,
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

PROTO = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
BUCKET_WEIGHT = 100


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
        internal = select_endpoints(candidates, node.name, svc.internal_local)
        external = select_endpoints(candidates, node.name, svc.external_local)
        proto = PROTO[port.protocol]
        frontends_internal = [(ip, port.port) for ip in svc.cluster_ips]
        frontends_external = [(ip, port.port) for ip in svc.external_ips]
        if port.node_port is not None:
            # the node's own addresses (a pod reaching them), and where the host DNATs NodePorts
            addresses = (*node.addresses, NODEPORT_VIP)
            frontends_external += [(ip, port.node_port) for ip in addresses]
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
            groups.append(_group(gid, selected))
            enter = f"{REG_SERVICE_GROUP.load(gid)},group:{gid}"
            flows.extend(_frontend(proto, ip, p, enter) for ip, p in frontends)
            flows.extend(_dnat(gid, proto, ep, svc.affinity_timeout) for ep in selected)
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


def _frontend(proto: str, ip: str, port: int, actions: str) -> Flow:
    return Flow(
        table=Table.SERVICE_LB,
        priority=PRIO_SERVICE,
        match=f"ct_state=+new+trk,{proto},nw_dst={ip},tp_dst={port}",
        actions=actions,
    )


def _group(gid: int, endpoints: list[Endpoint]) -> Group:
    """A bucket is an OpenFlow *action set* (one action of a kind, no learn): it only names the
    endpoint; ENDPOINT_DNAT does the rest in an ordinary action list."""
    buckets = []
    for i, ep in enumerate(endpoints):
        actions = [REG_ENDPOINT_IP.load(_ip_int(ep.ip)), REG_ENDPOINT_PORT.load(ep.port)]
        actions.append(resubmit(Table.ENDPOINT_DNAT))
        buckets.append(f"bucket=bucket_id:{i},weight:{BUCKET_WEIGHT},actions={','.join(actions)}")
    return Group(group_id=gid, type="select", selection_method="dp_hash", buckets=tuple(buckets))


def _dnat(gid: int, proto: str, ep: Endpoint, affinity: int | None) -> Flow:
    """With session affinity, every new connection (re)learns client → endpoint: kube-proxy's
    ClientIP timeout counts from the client's last new connection."""
    match = ",".join(
        [
            proto,
            REG_SERVICE_GROUP.match(gid),
            REG_ENDPOINT_IP.match(_ip_int(ep.ip)),
            REG_ENDPOINT_PORT.match(ep.port),
        ]
    )
    return Flow(
        table=Table.ENDPOINT_DNAT,
        priority=PRIO_SERVICE,
        match=match,
        actions=(f"{learn_affinity(proto, affinity)}," if affinity is not None else "")
        + ct_dnat_commit(ep.ip, ep.port, then=Table.EGRESS),
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
    a, b, c, d = (int(x) for x in ip.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


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
