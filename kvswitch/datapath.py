"""Pure translation: node state → OpenFlow flow models. No I/O here, so it is testable without root.

Table by table description: docs/pipeline.md. Every number and register comes from
:mod:`kvswitch.ovs.pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvswitch.config import ServiceProxy, VSwitchConfigSpec
from kvswitch.ovs.flows import Flow
from kvswitch.ovs.pipeline import (
    AFFINITY_HIT,
    FROM_GATEWAY,
    FROM_POD,
    FROM_TUNNEL,
    GATEWAY_MAC,
    HAIRPIN_SNAT,
    HAIRPIN_SNAT_IP,
    NODEPORT_VIP,
    PRIO_ANY_IP,
    PRIO_CLUSTER,
    PRIO_DEFAULT,
    PRIO_GATEWAY,
    PRIO_HAIRPIN,
    PRIO_LOW,
    PRIO_NO_HAIRPIN,
    PRIO_POD,
    PRIO_POLICY_ESTABLISHED,
    PRIO_POLICY_NODE,
    PRIO_REMOTE,
    PRIO_REPLY_TO_GATEWAY,
    PRIO_SERVICE_AFFINITY,
    PRIO_SKIP_EGRESS,
    REG_AFFINITY,
    REG_OUT_PORT,
    TUNNEL_KEY,
    CtMark,
    Table,
    arp_reply,
    arp_reply_any,
    ct_commit,
    ct_mark_match,
    ct_track_nat,
    ct_unsnat,
    goto,
    output,
    resubmit,
)


@dataclass(frozen=True)
class LocalPod:
    """A pod attachment as the CNI recorded it on its OVS port."""

    port: str
    ofport: int
    ip: str
    mac: str
    namespace: str = ""
    name: str = ""

    @property
    def key(self) -> str:
        return self.port


@dataclass(frozen=True)
class RemoteNode:
    name: str
    pod_cidr: str
    overlay_ip: str


def node_flows(spec: VSwitchConfigSpec, gateway_ofport: int, tunnel_ofport: int) -> list[Flow]:
    """The pipeline skeleton of this node: defaults, gateway, tunnel, conntrack, ARP for the gateway."""
    gw = gateway_ofport
    node_ip = spec.overlay_ip
    from_pod = f"ip,{FROM_POD.match}"
    from_host = f"ip,{FROM_GATEWAY.match}"
    return [
        # CLASSIFIER
        Flow(
            table=Table.CLASSIFIER,
            priority=PRIO_GATEWAY,
            match=f"arp,in_port={gw}",
            actions=goto(Table.ARP_RESPONDER),
        ),
        Flow(
            table=Table.CLASSIFIER,
            priority=PRIO_GATEWAY,
            match=f"ip,in_port={gw}",
            actions=f"{FROM_GATEWAY.load},{goto(Table.CONNTRACK)}",
        ),
        Flow(
            table=Table.CLASSIFIER,
            priority=PRIO_GATEWAY,
            match=f"ip,in_port={tunnel_ofport}",
            actions=f"{FROM_TUNNEL.load},{goto(Table.CONNTRACK)}",
        ),
        Flow(table=Table.CLASSIFIER, priority=PRIO_DEFAULT, actions="drop"),
        # SPOOF_GUARD: only per-pod allows; the rest is dropped
        Flow(table=Table.SPOOF_GUARD, priority=PRIO_DEFAULT, actions="drop"),
        # ARP_RESPONDER
        Flow(
            table=Table.ARP_RESPONDER,
            priority=PRIO_GATEWAY,
            match=f"arp,arp_tpa={spec.gateway_ip},arp_op=1",
            actions=arp_reply(spec.gateway_ip, GATEWAY_MAC),
        ),
        # the host resolves any cluster or Service address to the router MAC; L3_FORWARD routes by IP
        Flow(
            table=Table.ARP_RESPONDER,
            priority=PRIO_CLUSTER,
            match=f"arp,in_port={gw},arp_tpa={spec.cluster_cidr},arp_op=1",
            actions=arp_reply_any(GATEWAY_MAC),
        ),
        Flow(
            table=Table.ARP_RESPONDER,
            priority=PRIO_CLUSTER,
            match=f"arp,in_port={gw},arp_tpa={spec.service_cidr},arp_op=1",
            actions=arp_reply_any(GATEWAY_MAC),
        ),
        Flow(
            table=Table.ARP_RESPONDER,
            priority=PRIO_CLUSTER,
            match=f"arp,in_port={gw},arp_tpa={NODEPORT_VIP},arp_op=1",
            actions=arp_reply_any(GATEWAY_MAC),
        ),
        Flow(table=Table.ARP_RESPONDER, priority=PRIO_DEFAULT, actions="drop"),
        # CONNTRACK: a reply to a hairpin connection loses its SNAT first; then CT_ZONE (with NAT)
        Flow(
            table=Table.CONNTRACK,
            priority=PRIO_HAIRPIN,
            match=f"ip,nw_dst={HAIRPIN_SNAT_IP}",
            actions=ct_unsnat(Table.CT_ZONE),
        ),
        Flow(table=Table.CONNTRACK, priority=PRIO_ANY_IP, match="ip", actions=goto(Table.CT_ZONE)),
        Flow(table=Table.CONNTRACK, priority=PRIO_DEFAULT, actions="drop"),
        Flow(table=Table.CT_ZONE, priority=PRIO_ANY_IP, match="ip", actions=ct_track_nat(Table.CT_STATE)),
        Flow(table=Table.CT_ZONE, priority=PRIO_DEFAULT, actions="drop"),
        # CT_STATE: a new connection looks for session affinity, then for a Service frontend
        Flow(table=Table.CT_STATE, priority=PRIO_GATEWAY, match="ct_state=+inv+trk,ip", actions="drop"),
        Flow(
            table=Table.CT_STATE,
            priority=PRIO_LOW,
            match="ct_state=+new+trk,ip",
            actions=f"{resubmit(Table.SERVICE_AFFINITY)},{goto(Table.SERVICE_LB)}",
        ),
        Flow(table=Table.CT_STATE, priority=PRIO_DEFAULT, actions=goto(Table.EGRESS)),
        # SERVICE_AFFINITY holds learned entries only; SERVICE_LB the frontends (kvswitch.services)
        Flow(table=Table.SERVICE_AFFINITY, priority=PRIO_DEFAULT, actions="drop"),
        Flow(
            table=Table.SERVICE_LB,
            priority=PRIO_SERVICE_AFFINITY,
            match=f"ct_state=+new+trk,ip,{AFFINITY_HIT.match}",
            actions=goto(Table.ENDPOINT_DNAT),
        ),
        Flow(table=Table.SERVICE_LB, priority=PRIO_DEFAULT, actions=goto(Table.EGRESS)),
        # an affinity entry whose endpoint is gone: forget it and let the group choose again
        Flow(
            table=Table.ENDPOINT_DNAT,
            priority=PRIO_DEFAULT,
            actions=f"{REG_AFFINITY.load(0)},{resubmit(Table.SERVICE_LB)}",
        ),
        # EGRESS: a pod may always reach its own node (gateway or node IP)
        *_policy_stage(
            Table.EGRESS,
            Table.L3_FORWARD,
            [f"{from_pod},nw_dst={spec.gateway_ip}", f"{from_pod},nw_dst={node_ip}"],
        ),
        *_kube_proxy_egress(spec, from_pod),
        # L3_FORWARD
        Flow(
            table=Table.L3_FORWARD,
            priority=PRIO_GATEWAY,
            match=f"ip,nw_dst={spec.gateway_ip}",
            actions=_to_port(gw, GATEWAY_MAC),
        ),
        # The host handed this connection in after its own NAT (kube-proxy's DNAT): its replies
        # must meet that NAT again, so they go back through the host instead of straight to the pod.
        Flow(
            table=Table.L3_FORWARD,
            priority=PRIO_REPLY_TO_GATEWAY,
            match=f"ct_state=+rpl+trk,{ct_mark_match(CtMark.FROM_GATEWAY)},ip",
            actions=_to_port(gw, GATEWAY_MAC),
        ),
        Flow(
            table=Table.L3_FORWARD,
            priority=PRIO_NO_HAIRPIN,
            match=f"ip,{FROM_TUNNEL.match}",
            actions="drop",
        ),  # from the tunnel, only local destinations
        Flow(
            table=Table.L3_FORWARD,
            priority=PRIO_CLUSTER,
            match=f"ip,nw_dst={spec.cluster_cidr}",
            actions="drop",
        ),  # a pod CIDR no node owns
        Flow(
            table=Table.L3_FORWARD, priority=PRIO_LOW, match=f"ip,{FROM_GATEWAY.match}", actions="drop"
        ),  # the host sent something it should have routed itself: no loop
        Flow(
            table=Table.L3_FORWARD, priority=PRIO_ANY_IP, match="ip", actions=_to_port(gw, GATEWAY_MAC)
        ),  # services and the outside: via the host (SNAT)
        Flow(table=Table.L3_FORWARD, priority=PRIO_DEFAULT, actions="drop"),
        # INGRESS: the node reaches its pods (kubelet probes)
        *_policy_stage(
            Table.INGRESS,
            Table.OUTPUT,
            [f"{from_host},nw_src={spec.gateway_ip}", f"{from_host},nw_src={node_ip}"],
        ),
        # OUTPUT: a connection that got this far passed NetworkPolicy: committed as ALLOWED, so its
        # later packets and replies skip policy (a Service connection was committed at DNAT already,
        # not yet allowed: its first packets still meet policy).
        *(
            Flow(
                table=Table.OUTPUT,
                priority=prio,
                match=f"ct_state={state}+trk,{mark}ip{source}",
                actions=f"{ct_commit(*bits)},{goto(Table.EGRESS_METRIC)}",
            )
            for prio, source, bits in (
                (PRIO_LOW + 1, f",{FROM_GATEWAY.match}", (CtMark.ALLOWED, CtMark.FROM_GATEWAY)),
                (PRIO_LOW, "", (CtMark.ALLOWED,)),
            )
            for state, mark in (("+new", ""), ("-new", f"{ct_mark_match(unset=(CtMark.ALLOWED,))},"))
        ),
        Flow(table=Table.OUTPUT, priority=PRIO_DEFAULT, actions=goto(Table.EGRESS_METRIC)),
        # EGRESS_METRIC, INGRESS_METRIC: each rule's counter flows (kvswitch.policy.flows) sit
        # above these defaults; a packet of a connection no rule allowed is counted nowhere.
        Flow(table=Table.EGRESS_METRIC, priority=PRIO_DEFAULT, actions=goto(Table.INGRESS_METRIC)),
        Flow(table=Table.INGRESS_METRIC, priority=PRIO_DEFAULT, actions=output(REG_OUT_PORT)),
    ]


def _kube_proxy_egress(spec: VSwitchConfigSpec, from_pod: str) -> list[Flow]:
    """With kube-proxy, a pod's connection to a ClusterIP reaches the host before its DNAT: egress
    policy judges it when it comes back from the host with the backend as destination."""
    if spec.service_proxy != ServiceProxy.KUBE_PROXY:
        return []
    return [
        Flow(
            table=Table.EGRESS,
            priority=PRIO_SKIP_EGRESS,
            match=f"{from_pod},nw_dst={spec.service_cidr}",
            actions=goto(Table.L3_FORWARD),
        )
    ]


def _policy_stage(table: Table, then: Table, exempt: list[str]) -> list[Flow]:
    """The fixed flows of a policy table: replies and established connections never meet a
    policy, the node exemption, and a pass-through default; rules (kvswitch.policy.flows) and the
    isolation drops sit between them."""
    return [
        Flow(
            table=table,
            priority=PRIO_POLICY_ESTABLISHED,
            match=f"ct_state=-new+trk,{ct_mark_match(CtMark.ALLOWED)},ip",
            actions=goto(then),
        ),
        *(Flow(table=table, priority=PRIO_POLICY_NODE, match=m, actions=goto(then)) for m in exempt),
        Flow(table=table, priority=PRIO_DEFAULT, actions=goto(then)),
    ]


def _to_port(ofport: int, dst_mac: str, src_mac: str | None = None, then: Table = Table.OUTPUT) -> str:
    rewrite = f"set_field:{src_mac}->eth_src," if src_mac else ""
    return f"{rewrite}set_field:{dst_mac}->eth_dst,{REG_OUT_PORT.load(ofport)},{goto(then)}"


def pod_flows(pod: LocalPod) -> list[Flow]:
    """Classifier, spoof guard, ARP answer and delivery for one local pod."""
    p = pod.ofport
    return [
        Flow(
            table=Table.CLASSIFIER,
            priority=PRIO_POD,
            match=f"in_port={p}",
            actions=f"{FROM_POD.load},{goto(Table.SPOOF_GUARD)}",
        ),
        Flow(
            table=Table.SPOOF_GUARD,
            priority=PRIO_POD,
            match=f"ip,in_port={p},dl_src={pod.mac},nw_src={pod.ip}",
            actions=goto(Table.CONNTRACK),
        ),
        Flow(
            table=Table.SPOOF_GUARD,
            priority=PRIO_POD,
            match=f"arp,in_port={p},dl_src={pod.mac},arp_spa={pod.ip},arp_op=1,arp_sha={pod.mac}",
            actions=goto(Table.ARP_RESPONDER),
        ),
        Flow(
            table=Table.ARP_RESPONDER,
            priority=PRIO_POD,
            match=f"arp,arp_tpa={pod.ip},arp_op=1",
            actions=arp_reply(pod.ip, pod.mac),
        ),
        Flow(
            table=Table.L3_FORWARD,
            priority=PRIO_POD,
            match=f"ip,nw_dst={pod.ip}",
            actions=_to_port(p, pod.mac, GATEWAY_MAC, then=Table.INGRESS),
        ),
        # Hairpin (the pod reached itself through a Service): the pod must not see its own address as
        # the source, so the connection is SNATed (SNAT_ZONE) and leaves by the port it came in.
        *(
            Flow(
                table=Table.OUTPUT,
                priority=PRIO_HAIRPIN,
                match=f"ct_state={state}+trk,ip,{REG_OUT_PORT.match(p)},in_port={p},nw_src={pod.ip},nw_dst={pod.ip}",
                actions=f"{ct_commit(CtMark.ALLOWED)},{HAIRPIN_SNAT},IN_PORT"
                if state == "+new"
                else f"{HAIRPIN_SNAT},IN_PORT",
            )
            for state in ("+new", "-new")
        ),
        Flow(
            table=Table.OUTPUT,
            priority=PRIO_HAIRPIN - 1,
            match=f"ip,{REG_OUT_PORT.match(p)},in_port={p}",
            actions="IN_PORT",
        ),  # the hairpin connection's replies (already un-NATed)
    ]


def remote_node_flows(node: RemoteNode, tunnel_ofport: int) -> list[Flow]:
    """Everything for another node's pod CIDR goes into the tunnel towards its overlay IP (through
    OUTPUT, which commits the connection here too: its replies must find it in this node's conntrack)."""
    return [
        Flow(
            table=Table.L3_FORWARD,
            priority=PRIO_REMOTE,
            match=f"ip,nw_dst={node.pod_cidr}",
            actions=(
                f"set_field:{GATEWAY_MAC}->eth_src,"
                f"set_field:{node.overlay_ip}->tun_dst,"
                f"set_field:{TUNNEL_KEY:#x}->tun_id,"
                f"{REG_OUT_PORT.load(tunnel_ofport)},"
                f"{goto(Table.OUTPUT)}"
            ),
        )
    ]
