"""The local sandbox: simulated nodes with real Open vSwitch, pods, and a connectivity matrix."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from types import FrameType

from kvswitch.testbed import TestBed
from kvswitch.testbed.probes import full_matrix

BRIDGE = "k-vswitch0"


def _say(msg: str) -> None:
    print(f"[sandbox] {msg}", flush=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_sandbox(nodes: int = 3, pods_per_node: int = 2, hold: bool = False) -> int:
    """Bring the test bed up, wire pods into each node's bridge, print the matrix, tear down."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    bed = TestBed()
    started = time.monotonic()
    try:
        _say(f"run {bed.run_id}: starting {nodes} nodes (own ovsdb-server + ovs-vswitchd each)")
        for node in bed.add_nodes(nodes):
            _say(f"  {node.name}: netns {node.netns}, underlay {node.underlay_ip}")
            node.ovs.vsctl(
                "--may-exist", "add-br", BRIDGE, "--", "set", "bridge", BRIDGE, "datapath_type=netdev"
            )
        endpoints = []
        for node in bed.nodes.values():
            for i in range(pods_per_node):
                pod = bed.add_pod(node, f"{node.name}-p{i}")
                ip = f"10.244.{node.index}.{10 + i}"
                bed.plug(pod, BRIDGE, f"{ip}/24")
                endpoints.append((pod.name, pod.netns, ip))
                _say(f"  pod {pod.name} {ip} on {node.name}")
        _say(f"up in {time.monotonic() - started:.2f}s; probing ICMP, TCP and UDP between every pod pair")
        matrices = asyncio.run(full_matrix(endpoints))
        labels = [e[0] for e in endpoints]
        from kvswitch.testbed.probes import format_matrix

        for proto, results in matrices.items():
            print(f"\n{proto.upper()} (row = source, column = destination)")
            print(format_matrix(labels, results))
        print(
            "\nPods reach each other on their own node; cross-node paths need the overlay "
            "(the node agent programs it)."
        )
        if hold:
            _say("holding; press Ctrl-C to tear down")
            signal.pause()
        return 0
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        _say("tearing down")
        bed.teardown()
        _say("clean")


if __name__ == "__main__":
    sys.exit(run_sandbox())
