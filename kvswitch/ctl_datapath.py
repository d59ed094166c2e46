"""``kvswitchctl check-datapath``: is every cached megaflow what the OpenFlow tables say?

Registered as a product command through the ``kvswitchctl.commands`` entry-point group
(pyproject.toml). See kvswitch/ovs/coherence.py for how megaflows are traced.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvswitch.ovs import coherence

EXIT_COHERENT = 0
EXIT_INCOHERENT = 1
EXIT_ERROR = 2


def register_check_datapath(sub: Any) -> None:
    p = sub.add_parser(
        "check-datapath",
        help="trace every datapath megaflow through the OpenFlow tables; exit 1 when any disagrees",
        description=(
            "Dump the datapath flow cache (dpctl/dump-flows), trace each megaflow's key with "
            "ofproto/trace and print those whose cached actions differ from the tables' verdict. "
            "Flows are confirmed after a revalidator round, so a check during a flow change does "
            "not report flows that are merely about to be revalidated."
        ),
    )
    p.add_argument(
        "--bridge", default="k-vswitch0", help="bridge whose megaflows to check (default: %(default)s)"
    )
    p.add_argument("--all-bridges", action="store_true", help="check megaflows of every bridge")
    p.add_argument(
        "--rundir",
        default=None,
        help=f"ovs-vswitchd's run directory with its control socket (default: {coherence.DEFAULT_RUNDIR})",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also list megaflows that could not be traced"
    )
    p.set_defaults(func=_check_datapath)


def _check_datapath(args: argparse.Namespace) -> int:
    bridge = None if args.all_bridges else args.bridge
    try:
        with coherence.connect(args.rundir) as ctl:
            report = coherence.check_coherence(ctl, bridge)
    except coherence.AppctlError as exc:
        print(f"check-datapath: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for item in report.incoherent:
        print(item.render())
    if args.verbose:
        for flow, why in report.untraceable:
            print(f"untraceable ({why}): {flow.key} actions:{flow.actions}")
    print(report.summary())
    return EXIT_INCOHERENT if report.incoherent else EXIT_COHERENT
