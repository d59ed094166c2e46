"""CNI ADD+DEL cycle latency: k-vswitch-cni vs Debian's Go bridge + host-local, same run.

One cycle is what a pod start and stop cost the runtime: create the pod's network namespace,
exec the plugin for ADD, exec it for DEL, delete the namespace. Both plugins run inside the same
simulated node's namespace, exec'd the same way, interleaved so machine noise hits both alike.
Prints p50/p99 per plugin and the ratio (target: p50 ratio <= 1.5), plus two informational rows:
the server with DEL waiting for the kernel's veth deletion (interleaved too, so its ratio holds),
and the in-process fallback.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from kvswitch_testbed import TestBed, find_leaks
from kvswitch_testbed.cni_harness import CNI_BIN, CniNode
from kvswitch_testbed.cni_runner import Plugins, netns_path
from kvswitch_testbed.netns import run

from kvswitch.cni.server import CniServer, ServerThread

ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod;K8S_POD_UID=0000"


class Cycle:
    """ADD+DEL of one plugin with a fresh namespace per cycle; keeps per-phase timings."""

    def __init__(
        self, bed: TestBed, plugins: Plugins, plugin_type: str, conf: dict[str, Any], tag: str
    ) -> None:
        self.bed, self.plugins, self.type, self.conf, self.tag = bed, plugins, plugin_type, conf, tag
        self.total: list[float] = []
        self.add: list[float] = []
        self.delete: list[float] = []
        self.n = 0

    def __call__(self) -> None:
        self.n += 1
        ns = f"{self.bed.prefix}-b{self.tag}{self.n}"
        cid = f"bench-{self.tag}-{self.n}"
        t0 = time.perf_counter()
        run(["ip", "netns", "add", ns])
        t1 = time.perf_counter()
        added = self.plugins.exec(self.type, "ADD", self.conf, container_id=cid, netns=netns_path(ns),
                                  ifname="eth0", args=ARGS)  # fmt: skip
        t2 = time.perf_counter()
        deleted = self.plugins.exec(self.type, "DEL", self.conf, container_id=cid, netns=netns_path(ns),
                                    ifname="eth0", args=ARGS)  # fmt: skip
        t3 = time.perf_counter()
        run(["ip", "netns", "del", ns])
        t4 = time.perf_counter()
        if not (added.ok and deleted.ok):
            raise RuntimeError(f"{self.type}: ADD {added} / DEL {deleted}")
        self.add.append(t2 - t1)
        self.delete.append(t3 - t2)
        self.total.append(t4 - t0)

    def reset(self) -> None:
        self.total.clear()
        self.add.clear()
        self.delete.clear()


def pct(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] * 1000 if len(values) > 1 else 0.0


def line(label: str, c: Cycle) -> str:
    return (
        f"{label:<44} p50 {pct(c.total, 50):6.1f} ms  p99 {pct(c.total, 99):6.1f} ms"
        f"   (ADD p50 {pct(c.add, 50):5.1f}, DEL p50 {pct(c.delete, 50):5.1f}; n={len(c.total)})"
    )


def interleaved(cycles: list[Callable[[], None]], rounds: int) -> None:
    for _ in range(rounds):
        for c in cycles:
            c()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    bed = TestBed()
    try:
        cni = CniNode(bed)
        ours = Cycle(bed, cni.plugins, "k-vswitch-cni", cni.conf(), "k")
        bridge_conf = {
            "cniVersion": "1.0.0",  # the newest Debian's bridge 1.1.1 speaks
            "name": "bench-bridge",
            "type": "bridge",
            "bridge": "cni-bench0",
            "ipam": {"type": "host-local", "subnet": "10.30.0.0/16", "dataDir": str(cni.ipam_dir)},
        }
        bridge = Cycle(bed, Plugins([CNI_BIN], netns=cni.node.netns), "bridge", bridge_conf, "g")

        # The same server code with DEL waiting for the kernel's veth deletion, on its own socket.
        sync_socket = cni.workdir / "cni-sync.sock"
        sync_server = ServerThread(
            CniServer(sync_socket, host_netns=netns_path(cni.node.netns), defer_veth_delete=False)
        ).start()
        sync = Cycle(bed, cni.plugins, "k-vswitch-cni", cni.conf(serverSocket=str(sync_socket)), "s")

        try:
            interleaved([ours, sync, bridge], args.warmup)
            for c in (ours, sync, bridge):
                c.reset()
            interleaved([ours, sync, bridge], args.cycles)
        finally:
            sync_server.stop()
            cni.stop_server()

        fallback = Cycle(bed, cni.plugins, "k-vswitch-cni", cni.conf(in_process=True), "f")
        interleaved([fallback], max(10, args.cycles // 10))

        leftovers = cni.leftovers()
        cni.close()
    finally:
        bed.teardown()
    leaked = find_leaks(bed.run_id)

    print("CNI ADD+DEL cycle (netns add, ADD, DEL, netns del), one node, userspace OVS")
    print(line("k-vswitch-cni (CNI server, the default)", ours))
    print(line("Debian bridge + host-local (Go)", bridge))
    print(
        f"ratio k-vswitch-cni / bridge:  p50 {pct(ours.total, 50) / pct(bridge.total, 50):.2f}"
        f"   p99 {pct(ours.total, 99) / pct(bridge.total, 99):.2f}   (target: p50 <= 1.5)"
    )
    print(line("k-vswitch-cni, DEL waits for veth deletion", sync))
    print(f"ratio of that one / bridge:    p50 {pct(sync.total, 50) / pct(bridge.total, 50):.2f}")
    print(line("k-vswitch-cni in-process (no server)", fallback))
    if leftovers or leaked:
        raise SystemExit(f"benchmark left things behind: {leftovers} {leaked}")


if __name__ == "__main__":
    main()
