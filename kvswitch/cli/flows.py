"""``kvswitchctl flows --pod NS/POD``: one pod's flows on its node, by table, with counters.

The pod's own flows are found by their cookie (category POD, owner = the pod's OVS port); its
NetworkPolicy flows are the policy owner's flows that match its IP, and the conjunctions they feed.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Any

from kvswitch.cli.context import (
    CliError,
    Context,
    NodeOvs,
    PodPort,
    add_common_options,
    pod_ports,
    print_json,
    split_key,
)
from kvswitch.cli.trace import table_name
from kvswitch.ovs.flows import parse_dump_line
from kvswitch.ovs.pipeline import (
    CATEGORY_MASK,
    CATEGORY_SHIFT,
    OWNER_MASK,
    Category,
    Owner,
    category_filter,
    owner_hash,
)

_COUNTERS = re.compile(r"n_packets=(\d+), n_bytes=(\d+)")
_CONJ = re.compile(r"conjunction\((\d+),")


def register(sub: Any) -> None:
    p = sub.add_parser("flows", help="one pod's flows on its node, by table, with packet counters")
    p.add_argument("--pod", required=True, metavar="NS/POD")
    add_common_options(p)
    p.set_defaults(func=main)


@dataclass(frozen=True)
class FlowStat:
    table: int
    priority: int
    match: str
    actions: str
    cookie: int
    packets: int
    bytes: int
    why: str  # "pod" (its own flows) or "policy"

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "tableName": table_name(self.table),
            "priority": self.priority,
            "match": self.match,
            "actions": self.actions,
            "cookie": f"{self.cookie:#x}",
            "packets": self.packets,
            "bytes": self.bytes,
            "owner": self.why,
        }


def owner_filter(owner: Owner) -> str:
    """``cookie=value/mask`` selecting every round's flows of ``owner``."""
    value = (int(owner.category) << CATEGORY_SHIFT) | owner_hash(owner.name)
    return f"cookie={value:#x}/{CATEGORY_MASK | OWNER_MASK:#x}"


def dump(ovs: NodeOvs, *filters: str) -> list[FlowStat]:
    text = ovs.ofctl("dump-flows", ovs.bridge, ",".join(filters))
    out = []
    for line in text.splitlines():
        if " actions=" not in line:
            continue
        f = parse_dump_line(line)
        m = _COUNTERS.search(line)
        packets, nbytes = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        out.append(FlowStat(f.table, f.priority, f.match, f.actions, f.cookie, packets, nbytes, ""))
    return out


def pod_flows(ovs: NodeOvs, pod: PodPort) -> list[FlowStat]:
    own = [
        FlowStat(**{**f.__dict__, "why": "pod"})
        for f in dump(ovs, owner_filter(Owner(Category.POD, pod.port)))
    ]
    policy: dict[tuple[int, int, str], FlowStat] = {}
    if pod.ip:
        for field in ("nw_src", "nw_dst"):
            for f in dump(ovs, category_filter(Category.POLICY), f"ip,{field}={pod.ip}"):
                policy[(f.table, f.priority, f.match)] = f
        conj_ids = sorted({int(c) for f in policy.values() for c in _CONJ.findall(f.actions)})
        for cid in conj_ids:
            for f in dump(ovs, category_filter(Category.POLICY), f"conj_id={cid}"):
                policy[(f.table, f.priority, f.match)] = f
    tagged = [FlowStat(**{**f.__dict__, "why": "policy"}) for f in policy.values()]
    return sorted(own + tagged, key=lambda f: (f.table, -f.priority, f.match))


def render(pod: PodPort, node: str, flows: list[FlowStat]) -> str:
    out = [f"pod {pod.key} on {node}: port {pod.port} (ofport {pod.ofport}), {pod.ip}, {pod.mac}"]
    table = None
    for f in flows:
        if f.table != table:
            table = f.table
            out.append(f"\n{f.table:>3} {table_name(f.table)}")
        out.append(f"    priority={f.priority},{f.match or '*'} actions={f.actions}")
        out.append(f"        {f.packets} packets, {f.bytes} bytes  ({f.why})")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    try:
        ns, name = split_key(args.pod)
        ctx = Context.from_args(args)
        obj = ctx.cluster().pod(ns, name)
        node = (obj.get("spec") or {}).get("nodeName") or ""
        ovs = ctx.node(node)
        if ovs is None:
            raise CliError(f"pod {ns}/{name} runs on {node}, whose OVS is not reachable from here")
        pod = next((p for p in pod_ports(ovs.ports()) if p.key == f"{ns}/{name}"), None)
        if pod is None:
            raise CliError(f"pod {ns}/{name} has no port on {node}'s bridge {ovs.bridge}")
        flows = pod_flows(ovs, pod)
    except CliError as exc:
        print(f"kvswitchctl flows: {exc}", file=sys.stderr)
        return 2
    if args.output == "json":
        print_json(
            {
                "pod": pod.key,
                "node": node,
                "port": pod.port,
                "ofport": pod.ofport,
                "ip": pod.ip,
                "mac": pod.mac,
                "flows": [f.to_json() for f in flows],
            }
        )
    else:
        print(render(pod, node, flows))
    return 0
