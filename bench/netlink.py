"""The CNI's kernel steps: the hand-written rtnetlink (kvswitch.kernel) vs pyroute2, same run.

One ADD is what the plugin asks of the kernel for a pod: open a netlink socket in the pod's
namespace, create the veth with its peer born there (MTU, host MAC), set the pod end's MAC and
bring it up, add its address and default route, bring the host end up with its alias; DEL deletes
the host end (the peer goes with it; the kernel waits for an RCU grace period there). Both run in
a namespace of their own ("the node"), interleaved so machine noise hits every variant alike:

* warm (the CNI server's path): libraries imported, the node's socket / IPRoute already open;
  the pod's socket is opened per ADD (every pod is a new namespace);
* cold (the in-process fallback of ``k-vswitch-cni``): a fresh interpreter started inside the
  node's namespace imports the library, opens its sockets and runs one ADD and DEL; the import
  is timed inside the child, so interpreter start-up (the same for both) is left out.

pyroute2 runs twice on the warm path: with the pod socket opened by our setns thread
(``IPRoute(use_socket=...)``, the best case, and the figure the decision uses) and with its own
``IPRoute(netns=...)`` (which forks a helper process per socket). ``groups=0`` spares it the
multicast events of the default groups. Prints p50/p99 and the pyroute2/hand-written ratios, and
the decision rule of the "one kernel layer" issue: pyroute2 everywhere if it is within 10 % of the
hand-written code on the warm path (ADD+DEL p50).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

MTU = 1450
HOST_MAC = "02:00:00:00:00:01"
POD_MAC = "0a:58:0a:1e:00:02"
POD_IP, PREFIX, GATEWAY = "10.30.0.2", 24, "10.30.0.1"
ALIAS = "k-vswitch-cni bench netlink eth0"
POD_IF = "eth0"
THRESHOLD = 1.10


# --- the two implementations of the same steps -------------------------------------------------


class Handwritten:
    """kvswitch.kernel: Rtnl over a raw socket, pod socket from a setns(2) thread."""

    label = "hand-written (kvswitch.kernel)"

    def __init__(self, pod_path: str, host_ns: str | None) -> None:
        from kvswitch.kernel.rtnl import open_rtnl

        self.pod_fd = os.open(pod_path, os.O_RDONLY | os.O_CLOEXEC)
        self.host = open_rtnl(host_ns)

    def add(self, host_if: str) -> None:
        import ipaddress

        from kvswitch.kernel.rtnl import open_rtnl

        self.host.create_veth(host_if, POD_IF, self.pod_fd, MTU, HOST_MAC, None)
        with open_rtnl(self.pod_fd) as pod:
            link = pod.link(POD_IF)
            assert link is not None
            pod.set_link(link.index, up=True, mac=POD_MAC)
            pod.add_address(link.index, ipaddress.ip_interface(f"{POD_IP}/{PREFIX}"))
            pod.add_route(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address(GATEWAY), link.index)
        self.host.set_link(name=host_if, up=True, alias=ALIAS)

    def delete(self, host_if: str) -> None:
        self.host.delete_link(host_if)

    def close(self) -> None:
        self.host.close()
        os.close(self.pod_fd)


class Pyroute2:
    """pyroute2's IPRoute; the pod's socket from our setns thread (``own_netns``: from pyroute2)."""

    def __init__(self, pod_path: str, host_ns: str | None, own_netns: bool = False) -> None:
        from pyroute2 import IPRoute

        self.own_netns = own_netns
        self.label = "pyroute2, IPRoute(netns=...)" if own_netns else "pyroute2, IPRoute(use_socket=...)"
        self.pod_path = pod_path
        self.pod_fd = os.open(pod_path, os.O_RDONLY | os.O_CLOEXEC)
        self.host = IPRoute(groups=0, use_socket=self._socket(host_ns)) if host_ns else IPRoute(groups=0)

    @staticmethod
    def _socket(netns: int | str) -> Any:
        import socket

        from kvswitch.kernel.netns import sockets_in

        return sockets_in(netns, [(socket.AF_NETLINK, socket.SOCK_DGRAM, 0)])[0]

    def add(self, host_if: str) -> None:
        from pyroute2 import IPRoute

        peer = {"ifname": POD_IF, "net_ns_fd": self.pod_fd, "mtu": MTU}
        self.host.link("add", ifname=host_if, kind="veth", mtu=MTU, address=HOST_MAC, peer=peer)
        if self.own_netns:
            pod = IPRoute(groups=0, netns=self.pod_path, flags=0)
        else:
            pod = IPRoute(groups=0, use_socket=self._socket(self.pod_fd))
        with pod:
            index = pod.link_lookup(ifname=POD_IF)[0]
            pod.link("set", index=index, address=POD_MAC, state="up")
            pod.addr("add", index=index, address=POD_IP, prefixlen=PREFIX)
            pod.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=index)
        self.host.link("set", ifname=host_if, state="up", ifalias=ALIAS)

    def delete(self, host_if: str) -> None:
        self.host.link("del", ifname=host_if)

    def close(self) -> None:
        self.host.close()
        os.close(self.pod_fd)


IMPLEMENTATIONS: dict[str, Callable[[str, str | None], Handwritten | Pyroute2]] = {
    "hand": Handwritten,
    "pyroute2": Pyroute2,
    "pyroute2-netns": lambda pod, host: Pyroute2(pod, host, own_netns=True),
}
IMPORTS = {"hand": "kvswitch.kernel.rtnl", "pyroute2": "pyroute2", "pyroute2-netns": "pyroute2"}


# --- the cold path: one fresh interpreter per call ---------------------------------------------


def child(impl: str, pod_path: str, host_if: str) -> None:
    """Runs in a fresh interpreter inside the node's namespace; prints its timings as JSON."""
    import importlib

    t0 = time.perf_counter()
    importlib.import_module(IMPORTS[impl])
    if impl != "hand":
        importlib.import_module("kvswitch.kernel.netns")  # our setns helper for the pod socket
        from pyroute2 import IPRoute  # noqa: F401  (what a caller imports)
    t1 = time.perf_counter()
    kernel = IMPLEMENTATIONS[impl](pod_path, None)
    kernel.add(host_if)
    t2 = time.perf_counter()
    kernel.delete(host_if)
    t3 = time.perf_counter()
    kernel.close()
    print(json.dumps({"import": t1 - t0, "add": t2 - t1, "del": t3 - t2}))


# --- measuring ---------------------------------------------------------------------------------


class Figures:
    def __init__(self, label: str) -> None:
        self.label = label
        self.add: list[float] = []
        self.delete: list[float] = []
        self.imports: list[float] = []

    @property
    def total(self) -> list[float]:
        imports = self.imports or [0.0] * len(self.add)
        return [a + d + i for a, d, i in zip(self.add, self.delete, imports, strict=True)]

    def reset(self) -> None:
        self.add.clear()
        self.delete.clear()
        self.imports.clear()


def pct(values: list[float], p: int) -> float:
    if len(values) < 2:
        return values[0] * 1000 if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] * 1000


def row(f: Figures) -> str:
    parts = [
        f"{f.label:<36} {'import+' if f.imports else ''}ADD+DEL p50 {pct(f.total, 50):7.2f} ms"
        f"  p99 {pct(f.total, 99):7.2f} ms",
        f"   ADD p50 {pct(f.add, 50):6.2f} p99 {pct(f.add, 99):6.2f}",
        f"   DEL p50 {pct(f.delete, 50):6.2f}",
    ]
    if f.imports:
        parts.append(f"   import p50 {pct(f.imports, 50):6.1f}")
    return "".join(parts) + f"   (n={len(f.add)})"


def ratio(a: list[float], b: list[float], p: int) -> float:
    return pct(a, p) / pct(b, p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200, help="warm ADD+DEL cycles per variant")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--cold", type=int, default=30, help="cold (fresh interpreter) calls per variant")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "POD_NETNS", "HOST_IF"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from kvswitch_testbed import TestBed, find_leaks
    from kvswitch_testbed.netns import create_netns

    from kvswitch.kernel.netns import netns_path

    bed = TestBed()  # names carry a fresh run id; teardown deletes every namespace of the run
    host_ns, pod_ns = f"{bed.prefix}-nlhost", f"{bed.prefix}-nlpod"
    warm: dict[str, Figures] = {}
    cold: dict[str, Figures] = {}
    try:
        create_netns(host_ns)
        create_netns(pod_ns)
        pod_path = netns_path(pod_ns)
        kernels = {name: make(pod_path, host_ns) for name, make in IMPLEMENTATIONS.items()}
        try:
            warm = {name: Figures(k.label) for name, k in kernels.items()}
            verify(kernels["hand"], pod_path, "kvnlcheck0")
            verify(kernels["pyroute2"], pod_path, "kvnlcheck1")
            for i in range(args.warmup + args.iterations):
                if i == args.warmup:
                    for f in warm.values():
                        f.reset()
                for name, k in kernels.items():
                    host_if = f"kvnl{name[:3]}{i}"[:15]
                    t0 = time.perf_counter()
                    k.add(host_if)
                    t1 = time.perf_counter()
                    k.delete(host_if)
                    t2 = time.perf_counter()
                    warm[name].add.append(t1 - t0)
                    warm[name].delete.append(t2 - t1)
        finally:
            for k in kernels.values():
                k.close()

        cold = {name: Figures(warm[name].label) for name in ("hand", "pyroute2")}
        for i in range(args.cold):
            for name, f in cold.items():
                got = run_child(host_ns, name, pod_path, f"kvnlc{name[:3]}{i}")
                f.imports.append(got["import"])
                f.add.append(got["add"])
                f.delete.append(got["del"])
    finally:
        bed.teardown()
    leaked = find_leaks(bed.run_id)

    hand, best = warm["hand"], warm["pyroute2"]
    print("CNI kernel steps: veth into a pod netns, pod MAC/up/address/route, host end up; DEL")
    print(f"warm: the CNI server's path ({args.iterations} cycles each, interleaved)")
    for f in warm.values():
        print("  " + row(f))
    for name in ("pyroute2", "pyroute2-netns"):
        f = warm[name]
        print(
            f"  ratio {name} / hand-written: ADD+DEL p50 {ratio(f.total, hand.total, 50):.2f}"
            f" p99 {ratio(f.total, hand.total, 99):.2f}   ADD p50 {ratio(f.add, hand.add, 50):.2f}"
            f" p99 {ratio(f.add, hand.add, 99):.2f}   DEL p50 {ratio(f.delete, hand.delete, 50):.2f}"
        )
    print(f"cold: the in-process fallback, one fresh interpreter per call ({args.cold} calls each)")
    for f in cold.values():
        print("  " + row(f))
    c_hand, c_p2 = cold["hand"], cold["pyroute2"]
    print(
        f"  ratio pyroute2 / hand-written: import+ADD+DEL p50 {ratio(c_p2.total, c_hand.total, 50):.2f}"
        f" p99 {ratio(c_p2.total, c_hand.total, 99):.2f}"
        f"   import p50 {ratio(c_p2.imports, c_hand.imports, 50):.1f}"
    )
    within = pct(best.total, 50) <= THRESHOLD * pct(hand.total, 50)
    print(
        f"decision: pyroute2 is {'within' if within else 'not within'} 10 % of the hand-written code on the"
        f" warm path (ADD+DEL p50 ratio {ratio(best.total, hand.total, 50):.2f}) -> "
        + ("use pyroute2 everywhere" if within else "keep the hand-written rtnetlink")
    )
    if leaked:
        raise SystemExit(f"benchmark left things behind: {leaked}")


def run_child(host_ns: str, impl: str, pod_path: str, host_if: str) -> dict[str, float]:
    """One cold call: a fresh interpreter started inside the node's namespace (as a runtime would)."""
    from kvswitch.kernel.netns import in_netns

    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, pod_path, host_if]

    def start() -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)

    proc = in_netns(host_ns, start)
    if proc.returncode != 0:
        raise RuntimeError(f"cold {impl}: {proc.stderr.strip()}")
    got: dict[str, float] = json.loads(proc.stdout)
    return got


def verify(kernel: Handwritten | Pyroute2, pod_path: str, host_if: str) -> None:
    """Both implementations leave the pod in the same state (checked once, outside the timings)."""
    import socket

    from kvswitch.kernel.rtnl import RT_TABLE_MAIN, open_rtnl

    kernel.add(host_if)
    try:
        with open_rtnl(pod_path) as pod:
            link = pod.link(POD_IF)
            assert link is not None and link.up and link.mac == POD_MAC and link.mtu == MTU, link
            assert [a.address for a in pod.addresses(link.index, socket.AF_INET)] == [f"{POD_IP}/{PREFIX}"]
            routes = {(r.dst, r.gateway) for r in pod.routes(socket.AF_INET, RT_TABLE_MAIN)}
            assert ("0.0.0.0/0", GATEWAY) in routes, routes
    finally:
        kernel.delete(host_if)


if __name__ == "__main__":
    main()
