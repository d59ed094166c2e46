"""NetworkPolicy at scale, in one run.

1. Cluster-wide policy computation for Antrea's controller perf-test shape (25k namespaces, 100k
   pods, 75k policies): time and peak memory, against a naive evaluation (every policy's selectors
   checked against every pod, no index, no memo) measured on a 1 % sample in the same run.
   Antrea reports 5.8-6.4 s and 1.5-1.7 GB for this shape (Go).
2. Flow counts for growing N targets x M peers x P ports: conjunctive flows vs the cross product.
3. Event → flows installed on one node (the agent's incremental path: PolicyInputs, changed flow
   buckets, one reconciler bundle), on a real bridge already holding 100k flows, vs the floor of
   a raw ovs-ofctl bundle carrying exactly the same flow changes: a policy edit, a label change on
   a pod 1,000 policies select (as target, as peer), a namespace label change (1,000 policies'
   peer namespace; an Antrea-shape one). Goal: ratio <= 2.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import statistics
import time
from collections.abc import Callable
from multiprocessing import get_context
from typing import Any, ClassVar

from kvswitch_testbed import TestBed

from kvswitch.node.policy import PolicyInputs
from kvswitch.ovs.flows import Flow
from kvswitch.ovs.openflow import FlowReconciler, Ofctl
from kvswitch.ovs.ovsdb import Ovsdb
from kvswitch.ovs.pipeline import Category, Owner
from kvswitch.policy.compute import Clause, PolicyResult, PolicyState
from kvswitch.policy.flows import ConjIds, policy_flows
from kvswitch.policy.model import NamespaceInfo, PodInfo, Policy


def antrea_shape(namespaces: int, pods_per_ns: int, policies_per_ns: int) -> dict[str, list[Any]]:
    """Namespaces with team labels; pods with app/tier labels; per namespace: an app-to-app rule,
    a namespaceSelector rule, and an egress rule with an ipBlock and a named port."""
    out: dict[str, list[Any]] = {"namespaces": [], "pods": [], "policies": []}
    pod_n = 0
    for i in range(namespaces):
        ns = f"ns-{i}"
        out["namespaces"].append({"metadata": {"name": ns, "labels": {"team": f"team-{i % 100}"}}})
        for j in range(pods_per_ns):
            pod_n += 1
            out["pods"].append(
                {
                    "metadata": {
                        "name": f"pod-{j}",
                        "namespace": ns,
                        "labels": {"app": f"app-{j % 2}", "tier": f"tier-{j % 3}"},
                    },
                    "spec": {
                        "nodeName": f"node-{pod_n % 1000}",
                        "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
                    },
                    "status": {"podIP": f"10.{(pod_n >> 16) & 255}.{(pod_n >> 8) & 255}.{pod_n & 255}"},
                }
            )
        shapes = [
            {
                "podSelector": {"matchLabels": {"app": "app-0"}},
                "ingress": [
                    {"from": [{"podSelector": {"matchLabels": {"app": "app-1"}}}], "ports": [{"port": 80}]}
                ],
            },
            {
                "podSelector": {},
                "ingress": [
                    {
                        "from": [
                            {
                                "namespaceSelector": {"matchLabels": {"team": f"team-{(i + 1) % 100}"}},
                                "podSelector": {
                                    "matchExpressions": [
                                        {"key": "tier", "operator": "In", "values": ["tier-0", "tier-1"]}
                                    ]
                                },
                            }
                        ]
                    }
                ],
            },
            {
                "podSelector": {"matchLabels": {"tier": "tier-0"}},
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [
                            {"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}},
                            {"podSelector": {}},
                        ],
                        "ports": [{"port": "http"}, {"port": 53, "protocol": "UDP"}],
                    }
                ],
            },
        ]
        for k in range(policies_per_ns):
            out["policies"].append({"metadata": {"name": f"np-{k}", "namespace": ns}, "spec": shapes[k % 3]})
    return out


def _compute_child(namespaces: int, pods_per_ns: int, policies_per_ns: int, conn: Any) -> None:
    objs = antrea_shape(namespaces, pods_per_ns, policies_per_ns)
    pods = [PodInfo.parse(p) for p in objs["pods"]]
    nss = [NamespaceInfo.parse(n) for n in objs["namespaces"]]
    pols = [Policy.parse(p) for p in objs["policies"]]
    del objs
    gc.collect()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = PolicyState.build(pods, nss, pols).compute()
    elapsed = time.perf_counter() - t0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    conn.send((elapsed, rss_after * 1024, (rss_after - rss_before) * 1024, len(result.clauses)))


def naive_seconds(namespaces: int, pods_per_ns: int, policies_per_ns: int, sample: float) -> float:
    """Every policy against every pod and namespace (what an index avoids), on a sample, scaled up."""
    objs = antrea_shape(namespaces, pods_per_ns, policies_per_ns)
    pods = [PodInfo.parse(p) for p in objs["pods"]]
    nss = {n.name: n for n in (NamespaceInfo.parse(x) for x in objs["namespaces"])}
    pols = [Policy.parse(p) for p in objs["policies"]]
    step = max(1, int(1 / sample))
    t0 = time.perf_counter()
    for pol in pols[::step]:
        [p for p in pods if p.namespace == pol.namespace and pol.pod_selector.matches(p.label_map)]
        for rule in (pol.ingress or ()) + (pol.egress or ()):
            for peer in rule.peers or ():
                if peer.ip_block is not None:
                    continue
                ns_ok = {
                    n
                    for n, ns in nss.items()
                    if (peer.namespace_selector is None and n == pol.namespace)
                    or (
                        peer.namespace_selector is not None
                        and peer.namespace_selector.matches(dict(ns.labels))
                    )
                }
                sel = peer.pod_selector
                [p for p in pods if p.namespace in ns_ok and (sel is None or sel.matches(p.label_map))]
    return (time.perf_counter() - t0) * step


def flow_counts() -> None:
    print("\n2. flows for one rule: N targets x M peers x P ports (one node holds all N targets)")
    print(f"   {'N':>5} {'M':>5} {'P':>4} {'flows':>7} {'N+M+P':>7} {'N*M*P':>10}")
    for n, m, p in [(1, 1, 1), (10, 10, 10), (100, 100, 10), (100, 1000, 20), (1000, 1000, 50)]:
        local = [PodInfo("ns", f"t{i}", (), f"10.1.{i >> 8}.{i & 255}", "node") for i in range(n)]
        clause = Clause(
            "ns/np|in|0",
            True,
            frozenset(p.key for p in local),
            frozenset(f"10.2.{i >> 8}.{i & 255}" for i in range(m)),
            frozenset(("TCP", 1000 + 2 * k, 1000 + 2 * k) for k in range(p)),
        )
        result = PolicyResult([clause], ingress_isolated={x.key for x in local})
        flows = [f for f in policy_flows(result, local, ConjIds()) if "drop" not in f.actions]
        print(f"   {n:>5} {m:>5} {p:>4} {len(flows):>7} {n + m + p:>7} {n * m * p:>10}")


# The node under test (node-7) gets extra objects on top of the Antrea shape, so that one event
# touches 1,000 policies: two local pods ``busy/db-0``, ``busy/db-1`` selected (role=db) by 1,000
# policies of namespace ``busy``, each allowing one port from the Prometheus pods of the namespaces
# labelled purpose=monitoring (two in ``monitoring``, one in ``monitoring-2``).
NODE = "node-7"
SELECTED_BY = 1000


def thousand_policies() -> dict[str, list[Any]]:
    def pod(ns: str, name: str, labels: dict[str, str], node: str, ip: str) -> dict[str, Any]:
        return {
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]},
            "status": {"podIP": ip},
        }

    return {
        "namespaces": [
            {"metadata": {"name": "busy"}},
            {"metadata": {"name": "monitoring", "labels": {"purpose": "monitoring"}}},
            {"metadata": {"name": "monitoring-2", "labels": {"purpose": "monitoring"}}},
        ],
        "pods": [
            pod("busy", "db-0", {"role": "db"}, NODE, "10.200.0.1"),
            pod("busy", "db-1", {"role": "db"}, NODE, "10.200.0.2"),
            pod("monitoring", "prometheus-0", {"app": "prometheus"}, "node-1", "10.200.1.1"),
            pod("monitoring", "prometheus-1", {"app": "prometheus"}, "node-2", "10.200.1.2"),
            pod("monitoring-2", "prometheus-0", {"app": "prometheus"}, "node-3", "10.200.2.1"),
        ],
        "policies": [
            {
                "metadata": {"name": f"db-{k}", "namespace": "busy"},
                "spec": {
                    "podSelector": {"matchLabels": {"role": "db"}},
                    "ingress": [
                        {
                            "from": [
                                {
                                    "namespaceSelector": {"matchLabels": {"purpose": "monitoring"}},
                                    "podSelector": {"matchLabels": {"app": "prometheus"}},
                                }
                            ],
                            "ports": [{"port": 10_000 + k}],
                        }
                    ],
                },
            }
            for k in range(SELECTED_BY)
        ],
    }


def _relabel(obj: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    return {**obj, "metadata": {**obj["metadata"], "labels": labels}}


class RecordingOfctl(Ofctl):
    """Remembers the flow lines of the last bundle, to replay them raw."""

    last: ClassVar[list[str]] = []

    async def bundle_with_groups(
        self, group_adds: list[str], flow_lines: list[str], group_dels: list[str]
    ) -> None:
        RecordingOfctl.last = list(flow_lines)
        await super().bundle_with_groups(group_adds, flow_lines, group_dels)


async def change_latency(filler: int, repeat: int, namespaces: int) -> None:
    with TestBed() as bed:
        node = bed.add_node()
        db = Ovsdb(node.ovs.db_remote)
        db.ensure_bridge("k-vswitch0", datapath_type="netdev")
        node.ovs.wait_bridge("k-vswitch0")
        db.close()
        ofctl = RecordingOfctl("k-vswitch0", str(node.ovs.workdir))
        raw = Ofctl("k-vswitch0", str(node.ovs.workdir))
        rec = FlowReconciler(ofctl)
        await rec.set_many(
            {
                Owner(Category.TEST, f"f{o}"): [
                    Flow(
                        table=5,
                        priority=100,
                        match=f"ip,nw_dst=10.{o >> 8 & 255}.{o & 255}.{i}",
                        actions="drop",
                    )
                    for i in range(1, 11)
                ]
                for o in range(filler // 10)
            }
        )
        objs = antrea_shape(namespaces, 4, 3)  # pods spread over 1000 nodes; this node is node-7
        extra = thousand_policies()
        for kind in objs:
            objs[kind] += extra[kind]
        pods = [PodInfo.parse(p) for p in objs["pods"]]
        raw_ns = {n["metadata"]["name"]: n for n in objs["namespaces"]}
        raw_pods = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in objs["pods"]}
        # The agent's own path: PolicyInputs kept per event, its changed flow buckets to the
        # reconciler in one bundle (NodeAgent.apply_policy).
        inputs = PolicyInputs(NODE, lambda: [])
        inputs.replace(
            pods,
            [NamespaceInfo.parse(n) for n in objs["namespaces"]],
            [Policy.parse(x) for x in objs["policies"]],
        )
        await rec.set_many(inputs.flow_changes())
        inputs.installed()
        local = [p for p in pods if p.node == NODE]
        total_flows = len(inputs.table.flows())
        del objs, pods
        gc.collect()
        gc.freeze()  # as the agent does after loading the cluster (see NodeAgent.replace_policy_inputs)

        def policy_edit(r: int) -> None:
            ns = local[(r // 2) % len(local)].namespace
            edited = {
                "metadata": {"name": "np-0", "namespace": ns},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "app-0"}},
                    "ingress": [
                        {
                            "from": [{"podSelector": {"matchLabels": {"app": "app-1"}}}],
                            "ports": [{"port": 81 if r % 2 == 0 else 80}],  # there and back
                        }
                    ],
                },
            }
            inputs.set_policy(f"{ns}/np-0", Policy.parse(edited))

        def pod_label(key: str, labels: tuple[dict[str, str], dict[str, str]]) -> Callable[[int], None]:
            def edit(r: int) -> None:
                inputs.set_pod(key, PodInfo.parse(_relabel(raw_pods[key], labels[r % 2])))

            return edit

        def ns_label(name: str, labels: tuple[dict[str, str], dict[str, str]]) -> Callable[[int], None]:
            def edit(r: int) -> None:
                inputs.set_namespace(name, NamespaceInfo.parse(_relabel(raw_ns[name], labels[r % 2])))

            return edit

        # An Antrea-shape namespace whose team a local policy's namespaceSelector peer selects.
        peer_ns = f"ns-{(int(local[0].namespace[3:]) + 1) % 100}"
        team = raw_ns[peer_ns]["metadata"]["labels"]
        edits: list[tuple[str, Callable[[int], None]]] = [
            ("policy edit (a port of one policy)", policy_edit),
            (
                f"pod label: a local pod {SELECTED_BY} policies select",
                pod_label("busy/db-1", ({"role": "db-old"}, {"role": "db"})),
            ),
            (
                f"pod label: a peer pod of {SELECTED_BY} policies",
                pod_label("monitoring/prometheus-1", ({"app": "old"}, {"app": "prometheus"})),
            ),
            (
                f"namespace label: a peer namespace of {SELECTED_BY} policies",
                ns_label("monitoring-2", ({"purpose": "none"}, {"purpose": "monitoring"})),
            ),
            ("namespace label: an Antrea-shape peer namespace", ns_label(peer_ns, ({"team": "none"}, team))),
        ]
        print(
            f"\n3. event → flows installed on {NODE}: {len(local)} local pods, {total_flows} policy flows, "
            f"a bridge with {filler} more flows; {len(raw_pods)} pods, {len(inputs.state.policies)} "
            f"policies in the cluster. Floor: ovs-ofctl --bundle of the same flow changes, "
            f"replayed raw (median of {2 * repeat}; goal ratio <= 2)"
        )
        print(f"   {'event':<52} {'ours':>9} {'raw':>9} {'changes':>8} {'ratio':>6}")
        for name, edit in edits:
            ours: list[float] = []
            floor: list[float] = []
            sizes: list[int] = []
            for r in range(repeat):
                lines = []
                for half in (0, 1):  # there and back: the bridge ends as it began
                    t0 = time.perf_counter()
                    edit(2 * r + half)
                    n = await rec.set_many(inputs.flow_changes())
                    inputs.installed()
                    ours.append(time.perf_counter() - t0)
                    sizes.append(n)
                    lines.append(RecordingOfctl.last if n else [])
                for half in (0, 1):
                    t0 = time.perf_counter()
                    await raw.bundle(lines[half])
                    if lines[half]:
                        floor.append(time.perf_counter() - t0)
            o = statistics.median(ours)
            f = statistics.median(floor) if floor else float("nan")
            print(
                f"   {name:<52} {o * 1000:>7.1f}ms {f * 1000:>7.1f}ms {statistics.median(sizes):>8.0f} "
                f"{o / f:>6.2f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--namespaces", type=int, default=25_000)
    ap.add_argument("--pods-per-ns", type=int, default=4)
    ap.add_argument("--policies-per-ns", type=int, default=3)
    ap.add_argument("--filler-flows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sections", default="123", help="which of the sections to run, e.g. 3")
    args = ap.parse_args()
    if "1" in args.sections:
        computation(args)
    if "2" in args.sections:
        flow_counts()
    if "3" in args.sections:
        asyncio.run(change_latency(args.filler_flows, args.repeat, args.namespaces))


def computation(args: argparse.Namespace) -> None:
    ctx = get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_compute_child, args=(args.namespaces, args.pods_per_ns, args.policies_per_ns, child)
    )
    proc.start()
    elapsed, peak, grew, clauses = parent.recv()
    proc.join()
    sample = min(0.002, 20 / (args.namespaces * args.policies_per_ns))
    naive = naive_seconds(args.namespaces, args.pods_per_ns, args.policies_per_ns, sample=sample)
    pods, pols = args.namespaces * args.pods_per_ns, args.namespaces * args.policies_per_ns
    print(f"1. policy computation, {args.namespaces} namespaces / {pods} pods / {pols} policies:")
    print(
        f"   ours: {elapsed:.2f} s, {clauses} clauses, peak RSS {peak / 2**30:.2f} GiB "
        f"(+{grew / 2**30:.2f} GiB during the computation; Antrea, Go: 5.8-6.4 s, 1.5-1.7 GB)"
    )
    print(
        f"   naive selector evaluation ({sample:.3%} sample, scaled): {naive:.0f} s   "
        f"ratio ours/naive {elapsed / naive:.4f}"
    )


if __name__ == "__main__":
    main()
