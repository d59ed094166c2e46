"""The local sandbox: a whole k-vswitch cluster on one machine, no Kubernetes install needed.

Fake API server, k-vswitch-controller, one k-vswitchd per simulated node (each node a network
namespace with its own Open vSwitch), pods wired by k-vswitch-cni; then real packets between every
pair of pods, and out to a host beyond the cluster through SNAT; then Services over the pods (one per
node, one spanning all; TCP and UDP) reached from every pod and every node, balanced by k-vswitch's
OpenFlow proxy or by kube-proxy's nftables rules (``--service-proxy``).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from types import FrameType

from kvswitch_testbed.chartrun import ChartCluster
from kvswitch_testbed.cluster import EXTERNAL_IP, Cluster
from kvswitch_testbed.probes import (
    Answer,
    Endpoint,
    LoopThread,
    Outcome,
    WhoAmI,
    format_matrix,
    format_service_matrix,
    full_matrix,
    ping,
    service_matrix,
)

SERVICE_PORT = 80
WHOAMI_PORT = 8080
SERVICE_CONVERGE = 20.0  # seconds for the proxies to follow new Services


def _say(msg: str) -> None:
    print(f"[sandbox] {msg}", flush=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_sandbox(
    nodes: int = 3,
    pods_per_node: int = 2,
    overlay: str = "vxlan",
    hold: bool = False,
    service_proxy: str = "openflow",
    cluster: Cluster | None = None,
) -> int:
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if cluster is None:
        cluster = Cluster(nodes=nodes, overlay=overlay, service_proxy=service_proxy, say=_say)
    cluster.say = _say
    try:
        cluster.start()
        t0 = time.monotonic()
        endpoints = []
        for node in cluster.bed.nodes.values():
            for i in range(pods_per_node):
                pod_labels = {"app": f"p{i}", "node": node.name, "tier": "web"}
                cp = cluster.add_pod(node, f"{node.name}-p{i}", labels=pod_labels)
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
        failures += _services_demo(cluster, endpoints)
        failures += _policy_demo(cluster, endpoints, overlay)
        if isinstance(cluster, ChartCluster):  # helm uninstall: its hooks must leave every node clean
            failures += len(cluster.helm_uninstall())
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
        "metadata": {"name": "p1-only-from-p0", "namespace": "default",
                     "annotations": {"kvswitch.io/log": "true"}},
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
    return len(wrong) + _policy_observability(cluster)


def _policy_observability(cluster: Cluster) -> int:
    """The policy's rule counters (as kvswitchctl policy-stats reads them) and its audit log."""
    from kvswitch.cli.context import NodeOvs
    from kvswitch.cli.policy_stats import node_counters, render, rows
    from kvswitch.policy.model import Policy
    from kvswitch.policy.stats import rule_refs

    policy = cluster.client.get(
        "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/p1-only-from-p0"
    )
    refs = rule_refs([Policy.parse(policy)] if policy else [])
    per_node = {n: node_counters(NodeOvs(n, str(node.ovs.workdir))) for n, node in cluster.bed.nodes.items()}
    data = rows(per_node, refs, "default/p1-only-from-p0")
    print("\nper-rule statistics (kvswitchctl policy-stats)\n" + render(data))
    sessions = sum(r["sessions"] for r in data)
    logs = [cluster.audit_log(node) for node in cluster.bed.nodes.values()]
    deadline = time.monotonic() + 3  # the agents write their logs from a thread
    while True:
        lines = {log: log.read_text().splitlines() if log.exists() else [] for log in logs}
        allow = sum(" ALLOW " in x for ls in lines.values() for x in ls)
        deny = sum(" DENY " in x for ls in lines.values() for x in ls)
        if allow >= sessions or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for log, ls in lines.items():
        if ls:
            print(f"audit log {log}: {len(ls)} lines, the last: {ls[-1]}")
    if not sessions or allow != sessions or not deny:
        _say(f"policy statistics or audit log wrong: {sessions} sessions, {allow} allowed, {deny} denied")
        return 1
    return 0


def _services_demo(cluster: Cluster, endpoints: list[Endpoint]) -> int:
    """A Service per node (its pods) and one spanning all pods, TCP and UDP; every pod and every node
    asks every Service once per protocol. A cell counts when a pod of that Service answered."""
    ports = [
        {"name": proto.lower(), "port": SERVICE_PORT, "targetPort": WHOAMI_PORT, "protocol": proto}
        for proto in ("TCP", "UDP")
    ]
    pod_nodes = {e[0]: e[0].rsplit("-", 1)[0] for e in endpoints}  # pods are named <node>-p<i>
    members: dict[str, set[str]] = {}
    targets = []
    selectors = [(f"svc-{n}", {"node": n}) for n in cluster.bed.nodes] + [("svc-all", {"tier": "web"})]
    for name, selector in selectors:
        svc = cluster.add_service(name, selector, ports)
        ip = svc["spec"]["clusterIP"]
        members[name] = {pod for pod, node in pod_nodes.items() if selector.get("node", node) == node}
        targets.append((name, ip, SERVICE_PORT))
        _say(f"Service default/{name}: {ip}:{SERVICE_PORT} TCP+UDP -> {', '.join(sorted(members[name]))}")
    # a node's own source towards a ClusterIP is its gateway address (on kvs-gw0)
    nodes = [(n.name, n.netns, _gateway(cluster, n.name)) for n in cluster.bed.nodes.values()]
    clients = [*endpoints, *nodes]

    def good(client: str, target: str, got: Outcome) -> bool:
        return isinstance(got, Answer) and got.backend in members[target]

    with LoopThread() as loop:
        servers = [loop.run(WhoAmI(ns, ip, WHOAMI_PORT, name).start()) for name, ns, ip in endpoints]
        try:
            deadline = time.monotonic() + SERVICE_CONVERGE
            while True:  # until every proxy has every Service (or the deadline)
                results = loop.run(service_matrix(clients, targets))
                if all(good(c, t, got) for (_, c, t), got in results.items()) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            results = loop.run(service_matrix(clients, targets))  # fresh connections only
        finally:
            for server in servers:
                loop.run(server.stop())
    labels = [t[0] for t in targets]
    for proto in ("tcp", "udp"):
        print(
            f"\n{proto.upper()} to Services, proxy {cluster.service_proxy} (row = client pod or node, "
            "column = Service; cell = the backend that answered, * = it saw a NATed source)"
        )
        cells = {(c, t): got for (p, c, t), got in results.items() if p == proto}
        print(format_service_matrix(clients, labels, cells, good))
    wrong = [key for key, got in results.items() if not good(key[1], key[2], got)]
    if wrong:
        _say(f"Services not reached as expected (proto, client, Service): {wrong}")
    for name in labels:
        cluster.delete_service(name)
    return len(wrong)


def _gateway(cluster: Cluster, node: str) -> str:
    """The node's gateway address: the first of its pod CIDR."""
    base = cluster.pod_cidr(cluster.bed.nodes[node]).split("/")[0]
    return base.rsplit(".", 1)[0] + ".1"


async def _external(endpoints: list[tuple[str, str, str]]) -> list[bool]:
    return list(await asyncio.gather(*(ping(ns, EXTERNAL_IP) for _, ns, _ in endpoints)))


if __name__ == "__main__":
    sys.exit(run_sandbox())
