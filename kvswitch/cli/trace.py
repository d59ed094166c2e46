"""``kvswitchctl trace``: why a pod can or cannot reach another pod or an address.

Builds the packet from the pods' real attachments (port, MAC, IP from ovsdb; names from the API),
runs ``ovs-appctl ofproto/trace`` through the source node's pipeline and, when the packet leaves
into the tunnel, through the destination node's pipeline as it arrives from the tunnel. Prints every
flow the packet met with the table names of kvswitch/ovs/pipeline.py, the verdict, and for a drop
what decided it: the NetworkPolicy isolation (which policies, which direction; computed from the API
objects as the agents compute it), the spoof guard, or the missing route. For an allowed packet the
policy rule that allowed it is named too.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import sys
from dataclasses import dataclass, field
from typing import Any

from kvswitch.cli.context import (
    CliError,
    ClusterView,
    Context,
    NodeOvs,
    PodPort,
    add_common_options,
    describe_cookie,
    pod_ports,
    print_json,
    split_key,
)
from kvswitch.cli.explain import DirectionVerdict, RuleRef, judge
from kvswitch.cli.live import LiveHop, build_frame, run_live
from kvswitch.cli.ovstrace import OvsTrace, Step, parse_trace
from kvswitch.config import VSwitchConfigSpec
from kvswitch.ovs.pipeline import (
    GATEWAY_MAC,
    GATEWAY_OFPORT,
    PRIO_CLUSTER,
    PRIO_DEFAULT,
    PRIO_LOW,
    PRIO_NO_HAIRPIN,
    PRIO_POLICY_ALLOW,
    PRIO_POLICY_CONJ,
    PRIO_POLICY_ESTABLISHED,
    PRIO_POLICY_ISOLATED,
    PRIO_POLICY_NODE,
    TUNNEL_KEY,
    TUNNEL_OFPORT,
    Table,
)
from kvswitch.policy.compute import PolicyState

PROTOCOLS = ("tcp", "udp", "sctp", "icmp")
DEFAULT_SPORT = 40000


def register(sub: Any) -> None:
    p = sub.add_parser(
        "trace",
        help="trace a packet from a pod through the real pipeline of its node and the destination's",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--from", dest="source", required=True, metavar="NS/POD", help="the sending pod")
    p.add_argument("--to", dest="dest", required=True, metavar="NS/POD|IP", help="a pod or an IPv4 address")
    p.add_argument("--proto", choices=PROTOCOLS, default="tcp")
    p.add_argument("--dport", type=int, help="destination port (tcp, udp, sctp)")
    p.add_argument("--sport", type=int, default=DEFAULT_SPORT, help=f"source port (default {DEFAULT_SPORT})")
    p.add_argument("--src-ip", help="send with this source IP instead of the pod's (spoof-guard check)")
    p.add_argument("--src-mac", help="send with this source MAC instead of the pod's")
    p.add_argument(
        "--live",
        action="store_true",
        help="also send a real tagged packet from the pod's port and report which flows it met",
    )
    add_common_options(p)
    p.set_defaults(func=main)


# --- the packet -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    proto: str
    src_ip: str
    dst_ip: str
    sport: int | None
    dport: int | None
    src_mac: str
    dst_mac: str = GATEWAY_MAC  # every pod's next hop is the gateway's router MAC

    def l3l4(self) -> str:
        fields = [self.proto, f"nw_src={self.src_ip}", f"nw_dst={self.dst_ip}", "nw_ttl=64"]
        if self.proto == "icmp":
            fields += ["icmp_type=8", "icmp_code=0"]
        else:
            fields += [f"{self.proto}_src={self.sport}", f"{self.proto}_dst={self.dport}"]
        if self.proto == "tcp":
            fields.append("tcp_flags=syn")
        return ",".join(fields)

    def from_pod(self, ofport: int) -> str:
        return f"in_port={ofport},dl_src={self.src_mac},dl_dst={self.dst_mac},{self.l3l4()}"

    def from_tunnel(self, tun_src: str, tun_dst: str, dl_src: str, dl_dst: str) -> str:
        return (
            f"in_port={TUNNEL_OFPORT},tun_id={TUNNEL_KEY:#x},tun_src={tun_src},tun_dst={tun_dst},"
            f"dl_src={dl_src},dl_dst={dl_dst},{self.l3l4()}"
        )

    def describe(self) -> str:
        if self.proto == "icmp":
            return f"icmp echo {self.src_ip} -> {self.dst_ip}"
        return f"{self.proto} {self.src_ip}:{self.sport} -> {self.dst_ip}:{self.dport}"


# --- one node's part --------------------------------------------------------------------------


@dataclass
class Hop:
    node: str
    entry: str  # how the packet enters this node's bridge
    flow: str  # what ofproto/trace was given
    trace: OvsTrace
    bridge: str
    ports: list[PodPort]
    owners: dict[tuple[int, int], str]
    outcome: str = ""  # delivered | host | tunnel | dropped | rejected | reply | unknown
    detail: str = ""
    tunnel_to: str | None = None
    deciding: Step | None = None

    def steps(self) -> list[Step]:
        return [s for p in self.trace.passes for s in p.bridge_steps(self.bridge)]

    def last_in(self, table: Table) -> Step | None:
        found = [s for s in self.steps() if s.table == int(table) and s.depth == 0]
        return found[-1] if found else None

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "entry": self.entry,
            "flow": self.flow,
            "outcome": self.outcome,
            "detail": self.detail,
            "steps": [step_json(s, self.owners) for s in self.steps()],
            "datapathActions": [p.datapath_actions for p in self.trace.passes],
        }


def table_name(number: int) -> str:
    try:
        return Table(number).name
    except ValueError:
        return f"table {number}"


def step_json(s: Step, owners: dict[tuple[int, int], str]) -> dict[str, Any]:
    return {
        "table": s.table,
        "tableName": table_name(s.table),
        "depth": s.depth,
        "match": s.match,
        "priority": s.priority,
        "cookie": f"{s.cookie:#x}" if s.cookie is not None else None,
        "owner": describe_cookie(s.cookie, owners),
        "noMatch": s.no_match,
        "actions": s.actions,
    }


def run_hop(ovs: NodeOvs, cluster: ClusterView, entry: str, flow: str) -> Hop:
    ports = pod_ports(ovs.ports())
    trace = parse_trace(ovs.appctl("ofproto/trace", ovs.bridge, flow))
    hop = Hop(ovs.name, entry, flow, trace, ovs.bridge, ports, cluster.owner_names(ports))
    classify(hop, cluster)
    return hop


def classify(hop: Hop, cluster: ClusterView) -> None:
    last = hop.trace.last
    steps = hop.steps()
    actions = last.datapath_actions.strip()
    if any(s.rejects for s in steps):
        hop.outcome, hop.detail = (
            "rejected",
            "sent to the agent, which answers with a reject (Service without endpoints)",
        )
        return
    # (a logged drop sends the audit log a copy: its datapath actions are that, not "drop")
    audited_drop = bool(steps) and steps[-1].depth == 0 and steps[-1].drops
    if actions == "drop" or not steps or audited_drop:
        hop.outcome = "dropped"
        droppers = [s for s in steps if s.drops and s.depth == 0] or [s for s in steps if s.drops]
        hop.deciding = droppers[-1] if droppers else None
        return
    for s in reversed([s for s in last.bridge_steps(hop.bridge)]):
        if s.tunnel_to:
            hop.outcome, hop.tunnel_to = "tunnel", s.tunnel_to
            remote = cluster.node_of_overlay_ip(s.tunnel_to)
            hop.detail = f"into the tunnel to {remote or 'an unknown node'} ({s.tunnel_to})"
            return
        if s.in_port_reply:
            hop.outcome, hop.detail = "reply", "answered back to where it came from"
            return
        for port in s.output_ports:
            if port == GATEWAY_OFPORT:
                hop.outcome, hop.detail = (
                    "host",
                    "to the node's host network through the gateway (routed, SNAT outside the cluster)",
                )
                return
            pod = next((p for p in hop.ports if p.ofport == port), None)
            if pod is not None:
                hop.outcome, hop.detail = "delivered", f"delivered to pod {pod.key} (port {pod.port})"
                return
            hop.outcome, hop.detail = "delivered", f"output to port {port}"
            return
    hop.outcome, hop.detail = "unknown", f"datapath actions: {actions}"


# --- verdicts ---------------------------------------------------------------------------------


@dataclass
class PolicyStage:
    """What one policy table (EGRESS at the source, INGRESS at the destination) did."""

    node: str
    direction: str
    how: str  # established | node-exempt | rule | isolated | open | not-reached
    flow_match: str = ""
    api: DirectionVerdict | None = None
    note: str = ""

    def describe(self) -> str:
        text = {
            "established": "an established connection that passed policy before",
            "node-exempt": "exempt: a pod and its own node always talk",
            "open": "not isolated: no policy selects the pod for this direction",
            "not-reached": "not reached",
        }.get(self.how, "")
        if self.how in ("rule", "isolated") and self.api is not None:
            text = self.api.describe()
        elif self.how in ("rule", "isolated"):
            text = "allowed by a rule" if self.how == "rule" else "isolation default"
        return text + (f" ({self.note})" if self.note else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "direction": self.direction,
            "how": self.how,
            "flow": self.flow_match,
            "api": self.api.to_json() if self.api is not None else None,
            "note": self.note,
            "text": self.describe(),
        }


def policy_stage(
    hop: Hop,
    table: Table,
    direction: str,
    pod_key: str | None,
    peer_ip: str,
    packet: Packet,
    state: PolicyState,
    spec: VSwitchConfigSpec | None,
) -> PolicyStage | None:
    step = hop.last_in(table)
    if step is None:
        return None
    stage = PolicyStage(hop.node, direction, "open", step.match)
    prio = step.priority
    if prio == PRIO_POLICY_ESTABLISHED:
        stage.how = "established"
    elif prio == PRIO_POLICY_NODE:
        stage.how = "node-exempt"
        if spec is not None and f"nw_dst={spec.service_cidr}" in step.match:
            stage.note = "kube-proxy: judged when it returns from the host's DNAT"
    elif prio in (PRIO_POLICY_CONJ, PRIO_POLICY_ALLOW):
        stage.how = "rule"
    elif prio == PRIO_POLICY_ISOLATED and step.drops:
        stage.how = "isolated"
    elif prio == PRIO_DEFAULT:
        stage.how = "open"
    if stage.how in ("rule", "isolated", "open") and pod_key is not None and pod_key in state.pods:
        port = packet.dport if packet.proto != "icmp" else None
        stage.api = judge(state, pod_key, direction, peer_ip, packet.proto, port)
        if stage.how == "rule" and not stage.api.allowing:
            stage.note = "the API's policies allow no such rule: this node's flows are behind the API"
        elif stage.how == "isolated" and stage.api.allowing:
            stage.note = "the API allows it: this node's flows are behind the API"
        elif stage.how == "open" and stage.api.isolated:
            stage.note = "the API isolates the pod: this node's flows are behind the API"
    return stage


@dataclass
class Verdict:
    result: str  # delivered | forwarded | dropped | rejected | incomplete
    reason: str  # allowed | policy-egress | policy-ingress | spoof-guard | no-route | ...
    text: str
    node: str = ""
    table: str = ""  # where a drop was decided
    flow: str = ""  # the match of the flow that decided a drop
    allowed_by: list[RuleRef] = field(default_factory=list)  # the rules that let it through

    def to_json(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "reason": self.reason,
            "node": self.node,
            "table": self.table,
            "flow": self.flow,
            "allowedBy": [r.to_json() for r in self.allowed_by],
            "text": self.text,
        }


def drop_reason(
    hop: Hop, packet: Packet, spec: VSwitchConfigSpec | None, stages: list[PolicyStage]
) -> Verdict:
    step = hop.deciding
    if step is None:
        return Verdict("dropped", "drop", "dropped (no flow recorded)", hop.node)
    name = table_name(step.table)
    v = Verdict("dropped", "drop", f"dropped by a flow in {name}", hop.node, name, step.match)
    if step.no_match:
        v.reason, v.text = "no-match", f"no flow in {name} matched"
    elif step.table == Table.SPOOF_GUARD:
        pod = next((p for p in hop.ports if f"in_port={p.ofport}" in hop.flow.split(",")), None)
        own = f" (the pod's own: MAC {pod.mac}, IP {pod.ip})" if pod else ""
        v.reason = "spoof-guard"
        v.text = (
            "spoof guard: a pod may send only with its own MAC and IP; "
            f"this packet has MAC {packet.src_mac}, IP {packet.src_ip}{own}"
        )
    elif step.table in (Table.EGRESS, Table.INGRESS) and step.priority == PRIO_POLICY_ISOLATED:
        direction = "egress" if step.table == Table.EGRESS else "ingress"
        v.reason = f"policy-{direction}"
        stage = next((s for s in stages if s.node == hop.node and s.direction == direction), None)
        v.text = stage.describe() if stage is not None else f"{direction} isolation default"
    elif step.table == Table.L3_FORWARD:
        v.reason = "no-route"
        if step.priority == PRIO_CLUSTER:
            cidr = f" {spec.cluster_cidr}" if spec else ""
            v.text = f"no route: {packet.dst_ip} is in the cluster CIDR{cidr} but no node owns its pod CIDR"
        elif step.priority == PRIO_NO_HAIRPIN:
            v.text = (
                f"no route: arrived from the tunnel for {packet.dst_ip}, which is not a pod of {hop.node}"
            )
        elif step.priority == PRIO_LOW:
            v.reason, v.text = (
                "host-loop",
                "the host sent it back into OVS for an address it should route itself",
            )
        else:
            v.text = f"no route to {packet.dst_ip}"
    elif step.table == Table.CLASSIFIER:
        v.reason = "unknown-port"
        v.text = "entered on a port k-vswitch has no flows for (is the agent running and the pod attached?)"
    elif step.table == Table.CT_STATE:
        v.reason, v.text = "ct-invalid", "conntrack marks the packet invalid"
    return v


@dataclass
class TraceResult:
    source: str
    dest: str
    packet: Packet
    hops: list[Hop] = field(default_factory=list)
    stages: list[PolicyStage] = field(default_factory=list)
    verdict: Verdict | None = None
    notes: list[str] = field(default_factory=list)
    live: list[LiveHop] | None = None
    live_text: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.source,
            "to": self.dest,
            "packet": self.packet.describe(),
            "verdict": self.verdict.to_json() if self.verdict else None,
            "policy": [s.to_json() for s in self.stages],
            "nodes": [h.to_json() for h in self.hops],
            "notes": self.notes,
            "live": None
            if self.live is None
            else {"hops": [h.to_json(table_name) for h in self.live], "text": self.live_text},
        }


def trace(ctx: Context, cluster: ClusterView, args: argparse.Namespace) -> TraceResult:
    if args.proto != "icmp" and args.dport is None:
        raise CliError(f"--proto {args.proto} needs --dport")
    src_ns, src_name = split_key(args.source)
    src_obj = cluster.pod(src_ns, src_name)
    src_node = (src_obj.get("spec") or {}).get("nodeName") or ""
    src_key = f"{src_ns}/{src_name}"
    dest_key: str | None = None
    try:
        dst_ip = str(ipaddress.IPv4Address(args.dest))
        obj = cluster.pod_by_ip(dst_ip)
        if obj is not None:
            dest_key = f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
    except ValueError:
        dns, dname = split_key(args.dest)
        dobj = cluster.pod(dns, dname)
        dst_ip = (dobj.get("status") or {}).get("podIP") or ""
        if not dst_ip:
            raise CliError(f"pod {dns}/{dname} has no IP yet") from None
        dest_key = f"{dns}/{dname}"
    specs = cluster.specs()
    state = cluster.policy_state()
    src_ovs = ctx.node(src_node)
    src_port: PodPort | None = None
    src_ip = (src_obj.get("status") or {}).get("podIP") or ""
    src_mac = ""
    if src_ovs is not None:
        src_port = next((p for p in pod_ports(src_ovs.ports()) if p.key == src_key), None)
        if src_port is None:
            raise CliError(f"pod {src_key} has no port on {src_node}'s bridge {src_ovs.bridge}")
        src_ip, src_mac = src_ip or src_port.ip, src_port.mac
    packet = Packet(
        args.proto,
        args.src_ip or src_ip,
        dst_ip,
        None if args.proto == "icmp" else args.sport,
        None if args.proto == "icmp" else args.dport,
        (args.src_mac or src_mac or GATEWAY_MAC).lower(),
    )
    result = TraceResult(src_key, dest_key or dst_ip, packet)
    dst_node = cluster.node_of_ip(dst_ip)
    if src_ovs is not None and src_port is not None:
        entry = f"from pod {src_key} (port {src_port.port}, ofport {src_port.ofport})"
        hop = run_hop(src_ovs, cluster, entry, packet.from_pod(src_port.ofport))
        result.hops.append(hop)
        stage = policy_stage(hop, Table.EGRESS, "egress", src_key, dst_ip, packet, state, specs.get(src_node))
        if stage is not None:
            result.stages.append(stage)
    elif dst_node is not None and dst_node != src_node and ctx.node(dst_node) is not None:
        result.notes.append(
            f"{src_node}'s OVS is not reachable from here: its half of the path is not traced"
        )
    else:
        reachable = ", ".join(sorted(ctx.nodes)) or "none"
        raise CliError(
            f"neither {src_node}'s OVS nor the destination node's is reachable from here "
            f"(reachable: {reachable}; see --sandbox, --node-rundir)"
        )
    first = result.hops[0] if result.hops else None
    if first is None or first.outcome == "tunnel":
        target = cluster.node_of_overlay_ip(first.tunnel_to) if first and first.tunnel_to else dst_node
        src_spec, dst_spec = specs.get(src_node), specs.get(target or "")
        dst_ovs = ctx.node(target or "")
        if target is None or dst_spec is None or src_spec is None:
            result.notes.append("the tunnel's far end is no node the API knows")
        elif dst_ovs is None:
            result.notes.append(
                f"{target}'s OVS is not reachable from here: run the same command on {target} for its half"
            )
        else:
            final = first.trace.last.final_fields() if first is not None else {}
            flow = packet.from_tunnel(
                src_spec.overlay_ip,
                dst_spec.overlay_ip,
                final.get("dl_src") or GATEWAY_MAC,
                final.get("dl_dst") or packet.dst_mac,
            )
            hop = run_hop(dst_ovs, cluster, f"from the tunnel ({src_node} {src_spec.overlay_ip})", flow)
            result.hops.append(hop)
    last = result.hops[-1]
    if len(result.hops) > 1 or (last.node == dst_node):
        stage = policy_stage(
            last, Table.INGRESS, "ingress", dest_key, packet.src_ip, packet, state, specs.get(last.node)
        )
        if stage is not None:
            result.stages.append(stage)
    result.verdict = verdict(result, specs)
    if args.live:
        if src_ovs is None or src_port is None:
            raise CliError(f"--live sends from the source pod's port: {src_node}'s OVS must be reachable")
        live(ctx, result, src_port)
    return result


def live(ctx: Context, result: TraceResult, src_port: PodPort) -> None:
    """Send the real, tagged packet along the traced path (kvswitch.cli.live) and say how far it got."""
    p = result.packet
    nodes = []
    for i, traced in enumerate(result.hops):
        ovs = ctx.node(traced.node)
        assert ovs is not None  # it was traced
        forward = traced.outcome == "tunnel" and i < len(result.hops) - 1
        nodes.append((ovs, traced.steps(), forward))
    sport = random.randint(49152, 65535)
    dport = p.dport or 0

    def frame(dscp: int) -> bytes:
        return build_frame(p.proto, p.src_mac, p.dst_mac, p.src_ip, p.dst_ip, sport, dport, dscp)

    result.live = run_live(nodes, src_port.ofport, frame)
    last_seen = next(((h, t) for h in reversed(result.live) if (t := h.last_seen()) is not None), None)
    if last_seen is None:
        result.live_text = (
            "the real packet met none of the traced flows (was the pod's port or a flow replaced?)"
        )
        return
    seen_hop, tap = last_seen
    step = tap.step
    where = f"{seen_hop.node} {table_name(step.table)} ({step.match or '*'}, priority {step.priority})"
    if all(h.complete for h in result.live) and len(result.live) == len(result.hops):
        end = result.hops[-1]
        result.live_text = f"the real packet followed the traced path to its end, {where}: {end.outcome}"
        if end.outcome in ("delivered", "host"):
            result.live_text += (
                " (kvswitchctl stops injected packets at the output: no pod or host gets them)"
            )
    else:
        result.live_text = (
            f"the real packet was last seen at {where}; the traced path goes on from there, "
            "so it was dropped or took another way after that flow"
        )


def verdict(result: TraceResult, specs: dict[str, VSwitchConfigSpec]) -> Verdict:
    last = result.hops[-1]
    spec = specs.get(last.node)
    if last.outcome == "dropped":
        return drop_reason(last, result.packet, spec, result.stages)
    allowed_by = [r for s in result.stages if s.api is not None for r in s.api.allowing]
    why = "; ".join(f"{s.direction} at {s.node}: {s.describe()}" for s in result.stages)
    if last.outcome == "delivered":
        return Verdict(
            "delivered",
            "allowed",
            f"{last.detail}" + (f" — {why}" if why else ""),
            last.node,
            allowed_by=allowed_by,
        )
    if last.outcome == "host":
        return Verdict(
            "forwarded",
            "to-host",
            f"{last.detail}" + (f" — {why}" if why else ""),
            last.node,
            allowed_by=allowed_by,
        )
    if last.outcome == "tunnel":
        return Verdict("incomplete", "tunnel", f"{last.detail}; the far end was not traced", last.node)
    if last.outcome == "rejected":
        return Verdict("rejected", "no-endpoints", last.detail, last.node)
    return Verdict("forwarded", last.outcome, last.detail, last.node)


# --- printing ---------------------------------------------------------------------------------


def render(result: TraceResult) -> str:
    out = [f"trace {result.source} -> {result.dest}: {result.packet.describe()}", ""]
    for hop in result.hops:
        out.append(f"{hop.node} (bridge {hop.bridge}), {hop.entry}")
        out.append(f"  flow: {hop.flow}")
        for s in hop.steps():
            indent = "  " + "    " * s.depth
            if s.no_match:
                out.append(f"{indent}{s.table:>3} {table_name(s.table):<16} no flow matched")
            else:
                owner = describe_cookie(s.cookie, hop.owners)
                out.append(
                    f"{indent}{s.table:>3} {table_name(s.table):<16} {s.match or '*'}  "
                    f"[priority {s.priority}, {owner}]"
                )
            acts = [a for a in s.actions if not a.startswith("->") or "output" in a or "tunnel" in a]
            if acts:
                out.append(f"{indent}    {'; '.join(acts)}")
        out.append(f"  => {hop.outcome}: {hop.detail}" if hop.detail else f"  => {hop.outcome}")
        out.append("")
    for stage in result.stages:
        out.append(f"policy, {stage.direction} at {stage.node}: {stage.describe()}")
    for n in result.notes:
        out.append(f"note: {n}")
    if result.live is not None:
        for h in result.live:
            seen = {t.index: t for t in h.expected}
            tables = " > ".join(table_name(seen[i].step.table) for i in h.seen if i in seen) or "nothing"
            out.append(f"live, {h.node}: seen in {tables} ({len(h.seen)} of {len(h.expected)} traced flows)")
        out.append(f"live: {result.live_text}")
    v = result.verdict
    if v is not None:
        where = f" at {v.node} {v.table}".rstrip() if v.result == "dropped" else ""
        out.append(f"verdict: {v.result.upper()}{where} — {v.text}")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    try:
        ctx = Context.from_args(args)
        cluster = ctx.cluster()
        result = trace(ctx, cluster, args)
    except CliError as exc:
        print(f"kvswitchctl trace: {exc}", file=sys.stderr)
        return 2
    if args.output == "json":
        print_json(result.to_json())
    else:
        print(render(result))
    return 0
