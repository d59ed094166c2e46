"""The local sandbox: a whole k-vswitch cluster on one machine, no Kubernetes install needed.

Fake API server, k-vswitch-controller, one k-vswitchd per simulated node (each node a network
namespace with its own Open vSwitch), pods wired by k-vswitch-cni; then real packets between every
pair of pods, and out to a host beyond the cluster through SNAT.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from types import FrameType

from kvswitch_testbed.cluster import EXTERNAL_IP, Cluster
from kvswitch_testbed.probes import format_matrix, full_matrix, ping


def _say(msg: str) -> None:
    print(f"[sandbox] {msg}", flush=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_sandbox(nodes: int = 3, pods_per_node: int = 2, overlay: str = "vxlan", hold: bool = False) -> int:
    signal.signal(signal.SIGTERM, _raise_interrupt)
    cluster = Cluster(nodes=nodes, overlay=overlay, say=_say)
    try:
        cluster.start()
        t0 = time.monotonic()
        endpoints = []
        for node in cluster.bed.nodes.values():
            for i in range(pods_per_node):
                cp = cluster.add_pod(node, f"{node.name}-p{i}", labels={"app": f"p{i}", "node": node.name})
                endpoints.append((cp.name, cp.netns, cp.ip))
                _say(f"  pod default/{cp.name} on {node.name}: {cp.ip} (CNI ADD via k-vswitch-cni)")
        _say(f"{len(endpoints)} pods wired in {time.monotonic() - t0:.1f}s; probing ICMP, TCP and UDP")
        time.sleep(0.2)
        matrices = asyncio.run(full_matrix(endpoints))
        labels = [e[0] for e in endpoints]
        failures = 0
        for proto, results in matrices.items():
            print(f"\n{proto.upper()} over {overlay} (row = source, column = destination)")
            print(format_matrix(labels, results))
            failures += sum(not ok for ok in results.values())
        external = asyncio.run(_external(endpoints))
        print(f"\npods -> external host {EXTERNAL_IP} (SNAT): {sum(external)}/{len(external)} reachable")
        failures += external.count(False)
        failures += _policy_demo(cluster, endpoints, overlay)
        _say("all paths work" if failures == 0 else f"{failures} probes FAILED; logs under {cluster.workdir}")
        if hold:
            _say(f"holding; try: kubectl --kubeconfig {cluster.workdir}/kubeconfig.local get vsc")
            _say("Ctrl-C tears everything down")
            signal.pause()
        return 0 if failures == 0 else 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        _say("tearing down")
        cluster.stop()
        _say("clean")


def _policy_demo(cluster: Cluster, endpoints: list[tuple[str, str, str]], overlay: str) -> int:
    """A NetworkPolicy through the API: only app=p0 pods may reach the pods labelled app=p1."""
    target = [e for e in endpoints if e[0].endswith("-p1")]
    if not target:
        return 0
    cluster.client.create("/apis/networking.k8s.io/v1/namespaces/default/networkpolicies", {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "p1-only-from-p0", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "p1"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "p0"}}}]}]},
    })  # fmt: skip
    _say("NetworkPolicy p1-only-from-p0: pods labelled app=p1 accept only pods labelled app=p0")
    time.sleep(1.0)  # the agents watch the API; a second is plenty
    results = asyncio.run(full_matrix(endpoints))["tcp"]
    print(f"\nTCP over {overlay} with the policy (row = source, column = destination)")
    print(format_matrix([e[0] for e in endpoints], results))
    wrong = [
        (src, dst)
        for (src, dst), ok in results.items()
        if ok != (not dst.endswith("-p1") or src.endswith("-p0"))
    ]
    if wrong:
        _say(f"policy not as expected for {wrong}")
    return len(wrong)


async def _external(endpoints: list[tuple[str, str, str]]) -> list[bool]:
    return list(await asyncio.gather(*(ping(ns, EXTERNAL_IP) for _, ns, _ in endpoints)))


if __name__ == "__main__":
    sys.exit(run_sandbox())
