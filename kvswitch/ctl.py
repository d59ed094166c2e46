"""kvswitchctl: operator and developer commands."""

from __future__ import annotations

import argparse
import sys

from kvswitch.testbed.bed import RUN_PREFIX, RUN_ROOT, teardown_run
from kvswitch.testbed.netns import list_netns


def _clean_runs() -> int:
    runs = {p.name.removeprefix(RUN_PREFIX) for p in RUN_ROOT.glob(f"{RUN_PREFIX}*")}
    runs |= {ns.removeprefix(RUN_PREFIX).split("-", 1)[0] for ns in list_netns() if ns.startswith(RUN_PREFIX)}
    for run_id in sorted(runs):
        teardown_run(run_id)
        print(f"removed run {run_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvswitchctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sb = sub.add_parser("sandbox", help="start a local multi-node sandbox and show pod connectivity")
    sb.add_argument("--nodes", type=int, default=3)
    sb.add_argument("--pods-per-node", type=int, default=2)
    sb.add_argument("--overlay", choices=["vxlan", "gre", "geneve"], default="vxlan")
    sb.add_argument("--hold", action="store_true", help="keep it up until Ctrl-C")
    sub.add_parser("clean-runs", help="remove test-bed runs left behind by a killed process")
    args = parser.parse_args(argv)
    if args.command == "sandbox":
        from kvswitch.sandbox import run_sandbox

        return run_sandbox(args.nodes, args.pods_per_node, args.overlay, args.hold)
    return _clean_runs()


if __name__ == "__main__":
    sys.exit(main())
