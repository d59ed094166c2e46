"""``kvswitchctl policy-stats [--policy NS/NAME]``: per-rule NetworkPolicy statistics on each
node this invocation reaches: connections (sessions), packets and bytes of what each rule allowed.

Read from the nodes' rule counter flows (kvswitch.policy.stats), named from the API's policies:
rule ids are hashes of the rules' names, so no agent is asked. Counters start when a rule's flows
were installed on the node (an agent restart keeps them; a bridge that lost its flows restarts them).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvswitch.cli.context import CliError, Context, NodeOvs, add_common_options, print_json, split_key
from kvswitch.ovs.pipeline import Table
from kvswitch.policy.stats import RuleCounters, RuleRef, parse_counter_flows, rule_counters, rule_refs


def register(sub: Any) -> None:
    p = sub.add_parser(
        "policy-stats", help="per-rule NetworkPolicy statistics (sessions, packets, bytes) per node"
    )
    p.add_argument("--policy", metavar="NS/NAME", help="only this policy's rules")
    add_common_options(p)
    p.set_defaults(func=main)


def node_counters(ovs: NodeOvs) -> dict[tuple[bool, int], RuleCounters]:
    text = "".join(
        ovs.ofctl("dump-flows", ovs.bridge, f"table={int(t)}")
        for t in (Table.EGRESS_METRIC, Table.INGRESS_METRIC)
    )
    return rule_counters(parse_counter_flows(text))


def rows(
    per_node: dict[str, dict[tuple[bool, int], RuleCounters]], refs: dict[int, RuleRef], only: str | None
) -> list[dict[str, Any]]:
    out = []
    for node, counters in sorted(per_node.items()):
        for (ingress, rule), c in counters.items():
            ref = refs.get(rule)
            if only is not None and (ref is None or ref.policy != only):
                continue
            out.append(
                {
                    "node": node,
                    "policy": ref.policy if ref else f"(unknown rule {rule:#018x})",
                    "direction": "ingress" if ingress else "egress",
                    "rule": ref.index if ref else None,
                    "sessions": c.sessions,
                    "packets": c.packets,
                    "bytes": c.bytes,
                }
            )
    return sorted(out, key=lambda r: (r["policy"], r["direction"], r["rule"] or 0, r["node"]))


def render(data: list[dict[str, Any]]) -> str:
    if not data:
        return "no NetworkPolicy rule has flows on the nodes reached"
    head = ("POLICY", "DIRECTION", "RULE", "NODE", "SESSIONS", "PACKETS", "BYTES")
    table = [head] + [
        (
            r["policy"],
            r["direction"],
            "-" if r["rule"] is None else str(r["rule"]),
            r["node"],
            str(r["sessions"]),
            str(r["packets"]),
            str(r["bytes"]),
        )
        for r in data
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in table
    )


def main(args: argparse.Namespace) -> int:
    try:
        only = "/".join(split_key(args.policy)) if args.policy else None
        ctx = Context.from_args(args)
        refs = rule_refs(ctx.cluster().parsed_policies())
        data = rows({name: node_counters(ovs) for name, ovs in ctx.nodes.items()}, refs, only)
    except CliError as exc:
        print(f"kvswitchctl policy-stats: {exc}", file=sys.stderr)
        return 2
    if args.output == "json":
        print_json(data)
    else:
        print(render(data))
    return 0
