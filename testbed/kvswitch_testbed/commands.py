"""kvswitchctl sub-commands that need the test kit, registered through the
``kvswitchctl.commands`` entry-point group of this distribution."""

from __future__ import annotations

import argparse
from typing import Any


def register_sandbox(sub: Any) -> None:
    sb = sub.add_parser("sandbox", help="start a local multi-node sandbox and show pod connectivity")
    sb.add_argument("--nodes", type=int, default=3)
    sb.add_argument("--pods-per-node", type=int, default=2)
    sb.add_argument("--overlay", choices=["vxlan", "gre", "geneve"], default="vxlan")
    sb.add_argument(
        "--service-proxy",
        choices=["openflow", "kube-proxy"],
        default="openflow",
        help="who balances Services: k-vswitch in OpenFlow, or kube-proxy's nftables rules on each node",
    )
    sb.add_argument("--hold", action="store_true", help="keep it up until Ctrl-C")
    sb.add_argument(
        "--from-chart",
        action="store_true",
        help="run the Helm chart's own pods (podman, image from `make image`) instead of local processes",
    )
    sb.set_defaults(func=_sandbox)


def register_clean_runs(sub: Any) -> None:
    sub.add_parser("clean-runs", help="remove test-bed runs left behind by a killed process").set_defaults(
        func=_clean_runs
    )


def _sandbox(args: argparse.Namespace) -> int:
    from kvswitch_testbed.sandbox import run_sandbox

    cluster = None
    if args.from_chart:
        from kvswitch_testbed.chartrun import ChartCluster

        cluster = ChartCluster(nodes=args.nodes, overlay=args.overlay, service_proxy=args.service_proxy)
    return run_sandbox(
        args.nodes, args.pods_per_node, args.overlay, args.hold, args.service_proxy, cluster=cluster
    )


def _clean_runs(args: argparse.Namespace) -> int:
    from kvswitch_testbed.bed import RUN_PREFIX, RUN_ROOT, teardown_run
    from kvswitch_testbed.chartrun import remove_run_containers
    from kvswitch_testbed.netns import list_netns

    runs = {p.name.removeprefix(RUN_PREFIX) for p in RUN_ROOT.glob(f"{RUN_PREFIX}*")}
    runs |= {ns.removeprefix(RUN_PREFIX).split("-", 1)[0] for ns in list_netns() if ns.startswith(RUN_PREFIX)}
    for run_id in sorted(runs):
        remove_run_containers(run_id)  # the chart-driven sandbox's podman containers
        teardown_run(run_id)
        print(f"removed run {run_id}")
    return 0
