"""``kvswitchctl policy --pod NS/POD``: which NetworkPolicies and rules select a pod, per direction,
and which rules name it as a peer; computed from the API objects as the agents compute them."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvswitch.cli.context import CliError, Context, add_common_options, print_json, split_key
from kvswitch.cli.explain import pod_policies


def register(sub: Any) -> None:
    p = sub.add_parser("policy", help="the NetworkPolicies and rules that select a pod, per direction")
    p.add_argument("--pod", required=True, metavar="NS/POD")
    add_common_options(p)
    p.set_defaults(func=main)


def render(data: dict[str, Any]) -> str:
    out = [f"pod {data['pod']} ({data['ip'] or 'no IP yet'}, node {data['node'] or '-'})"]
    for direction in ("ingress", "egress"):
        d = data[direction]
        if not d["isolated"]:
            out.append(f"{direction}: not isolated (no policy selects it): everything allowed")
            continue
        n = len(d["policies"])
        out.append(
            f"{direction}: isolated by {n} polic{'y' if n == 1 else 'ies'}; allowed only what a rule allows"
        )
        for p in d["policies"]:
            out.append(f"  {p['policy']}")
            if not p["rules"]:
                out.append(f"    no {direction} rules: nothing allowed")
            for r in p["rules"]:
                resolved = r["resolvedPeers"]
                peers = "any address" if resolved is None else ", ".join(resolved) or "no address"
                note = "  (selects nothing now)" if r["selectsNothing"] else ""
                out.append(f"    rule {r['rule']}: {r['peers']}; {r['ports']}{note}")
                out.append(f"      now: {peers}")
    if data["peerOf"]:
        out.append("named as a peer by:")
        for ref in data["peerOf"]:
            out.append(
                f"  {ref['policy']} {ref['direction']} rule {ref['rule']} (for {', '.join(ref['targets'])})"
            )
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    try:
        ns, name = split_key(args.pod)
        cluster = Context.from_args(args).cluster()
        cluster.pod(ns, name)
        data = pod_policies(cluster.policy_state(), f"{ns}/{name}")
    except CliError as exc:
        print(f"kvswitchctl policy: {exc}", file=sys.stderr)
        return 2
    if args.output == "json":
        print_json(data)
    else:
        print(render(data))
    return 0
