"""One agent at cluster scale: memory, event throughput, cold start. Figures and goals printed.

The cluster: 50,000 pods in 5,000 namespaces with 10,000 NetworkPolicies, the objects shaped as
the API server sends them in a watch (metadata with uid, owner references, managedFields; pod spec
with containers, ports, resources, volumes; status with conditions and IPs), the node under test
holding 110 of the pods.

1. Memory (in a fresh process): every object goes through ``json.loads`` (what the watch client
   hands over) and the handlers' parsing into a ``NodeAgent`` (``PodInfo.parse`` → ``set_pod`` and
   so on), then the node's policy flows are computed; RSS of that process, and tracemalloc's
   biggest allocation sites in a second fresh process. Also shown: what the real agent's informers
   keep per object (key and resourceVersion), and an idle agent's RSS (its imports). Goal:
   <= 250 MiB (Cilium's agent at 1,000 nodes / 50k pods: 438 MiB average). Section 2 prints the
   real agent process's RSS as well.
2. Event throughput, through the real watch: a real agent process (``k-vswitchd``: kopf and the
   informers; the test kit's Cluster: fake API server, real OVS node) holding the cluster above;
   1,000 pod events per second (create / relabel / delete, in namespaces the node's policies
   read) for 10 s; then the lag until the node's policy flows are what a fresh computation from
   the API's objects gives (every flow, byte for byte with conjunction ids matched). Goal: keeps
   up, lag <= 1 s.
3. Cold start: that agent killed and started again on its node with 110 pods: time from the process
   start to every flow of the new round installed and the old round removed, with a ping stream
   between two of the node's pods (100/s) counting losses. Goal: <= 5 s, 0 lost.

``--sections 1`` runs only the in-process memory part (no root, no OVS).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

MIB = 1 << 20
NODE = "node1"
LOCAL_PODS = 110


# --- the cluster, as the API server sends it ------------------------------------------------------


def _meta(name: str, namespace: str | None, serial: int, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "uid": f"{serial:08x}-7c1e-4b5a-9d3e-{serial:012x}",
        "resourceVersion": str(100_000 + serial),
        "creationTimestamp": "2026-01-15T10:20:30Z",
        "labels": labels,
    }
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def namespace_object(i: int) -> dict[str, Any]:
    name = f"ns-{i}"
    meta = _meta(name, None, i, {"kubernetes.io/metadata.name": name, "team": f"team-{i % 50}"})
    meta["managedFields"] = [
        {
            "manager": "kubectl-create",
            "operation": "Update",
            "apiVersion": "v1",
            "time": "2026-01-15T10:20:30Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": {
                "f:metadata": {"f:labels": {".": {}, "f:kubernetes.io/metadata.name": {}, "f:team": {}}}
            },
        }
    ]
    return {
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def pod_ip(serial: int) -> str:
    return f"10.{128 + (serial >> 16)}.{(serial >> 8) & 255}.{serial & 255}"


def pod_object(ns: int, j: int, serial: int, node: str, ip: str) -> dict[str, Any]:
    """A Deployment's pod: app/tier/version labels, a ReplicaSet owner, one container with a named
    port, the service account volume, the kubelet's status."""
    app = f"app-{j % 4}"
    rs = f"{app}-7d4f8b9c{j % 4}"
    name = f"{rs}-{serial:05x}"
    labels = {"app": app, "tier": ("front", "back", "db")[j % 3], "pod-template-hash": f"7d4f8b9c{j % 4}"}
    meta = _meta(name, f"ns-{ns}", serial, labels)
    meta["generateName"] = f"{rs}-"
    meta["ownerReferences"] = [
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "name": rs,
            "uid": f"{ns:08x}-0000-4000-8000-{j % 4:012x}",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    meta["managedFields"] = [
        {
            "manager": "kube-controller-manager",
            "operation": "Update",
            "apiVersion": "v1",
            "time": "2026-01-15T10:20:30Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}}}},
        }
    ]
    now = "2026-01-15T10:20:31Z"
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": {
            "volumes": [
                {
                    "name": f"kube-api-access-{serial % 99999:05d}",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {
                                "configMap": {
                                    "name": "kube-root-ca.crt",
                                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                }
                            },
                        ],
                        "defaultMode": 420,
                    },
                }
            ],
            "containers": [
                {
                    "name": app,
                    "image": f"registry.example.com/{app}:1.4.{j % 7}",
                    "ports": [
                        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
                    ],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "nodeName": node,
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
                {
                    "key": "node.kubernetes.io/unreachable",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
            ],
            "priority": 0,
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": now}
                for t in (
                    "PodReadyToStartContainers",
                    "Initialized",
                    "Ready",
                    "ContainersReady",
                    "PodScheduled",
                )
            ],
            "hostIP": f"10.250.{(serial >> 8) & 255}.{serial & 255}",
            "hostIPs": [{"ip": f"10.250.{(serial >> 8) & 255}.{serial & 255}"}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": now,
            "containerStatuses": [
                {
                    "name": app,
                    "state": {"running": {"startedAt": now}},
                    "lastState": {},
                    "ready": True,
                    "restartCount": 0,
                    "image": f"registry.example.com/{app}:1.4.{j % 7}",
                    "imageID": f"registry.example.com/{app}@sha256:{serial:064x}",
                    "containerID": f"containerd://{serial:064x}",
                    "started": True,
                }
            ],
            "qosClass": "Burstable",
        },
    }


def policy_object(ns: int, k: int, serial: int) -> dict[str, Any]:
    """Two shapes per namespace: front→back on a named port plus monitoring from the team's
    namespaces; egress of the back tier to the db tier, DNS anywhere, and an external range."""
    name = f"np-{k}"
    if k % 2 == 0:
        spec: dict[str, Any] = {
            "podSelector": {"matchLabels": {"tier": "back"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"tier": "front"}}}], "ports": [{"port": "http"}]},
                {
                    "from": [
                        {
                            "namespaceSelector": {"matchLabels": {"team": f"team-{(ns + 1) % 50}"}},
                            "podSelector": {"matchLabels": {"app": "app-3"}},
                        }
                    ],
                    "ports": [{"port": 9090, "protocol": "TCP"}],
                },
            ],
        }
    else:
        spec = {
            "podSelector": {
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["back", "db"]}]
            },
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [{"podSelector": {"matchLabels": {"tier": "db"}}}], "ports": [{"port": 5432}]},
                {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
                {"to": [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}]},
            ],
        }
    meta = _meta(name, f"ns-{ns}", serial, {})
    meta["generation"] = 1
    meta["annotations"] = {
        "kubectl.kubernetes.io/last-applied-configuration": json.dumps(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": name},
                "spec": spec,
            }
        )
    }
    return {"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1", "metadata": meta, "spec": spec}


def cluster(
    pods: int, namespaces: int, policies: int, local_ips: list[str] | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind, object) of the whole cluster: namespaces, then pods, then policies. The first
    LOCAL_PODS pods (of ns-0 .. ns-10) run on NODE, with ``local_ips`` (default 10.244.1.x)."""
    for i in range(namespaces):
        yield "namespace", namespace_object(i)
    per_ns = pods // namespaces
    serial = 0
    for i in range(namespaces):
        for j in range(per_ns):
            local = serial < LOCAL_PODS
            ip = pod_ip(serial)
            if local:
                ip = local_ips[serial] if local_ips else f"10.244.1.{serial + 2}"
            node = NODE if local else f"node-{2 + serial % 999}"
            yield "pod", pod_object(i, j, serial, node, ip)
            serial += 1
    per_ns_pol = max(1, policies // namespaces)
    n = 0
    for i in range(namespaces):
        for k in range(per_ns_pol):
            if n >= policies:
                return
            yield "policy", policy_object(i, k, n)
            n += 1


# --- 1. memory, in a fresh process ------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int | str = "self") -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MiB."""
    with open(f"/proc/{pid}/status") as f:
        status = f.read()

    def field(name: str) -> float:
        return int(status.split(name + ":")[1].split()[0]) / 1024

    return field("VmRSS"), field("VmHWM")


def load_agent(pods: int, namespaces: int, policies: int, trace: bool) -> dict[str, Any]:
    """In this (fresh) process: the agent's objects, fed as the handlers feed them."""
    os.environ.setdefault("NODE_NAME", NODE)
    import kopf  # noqa: F401  (the agent's imports, in the baseline)
    import kubernetes_asyncio  # noqa: F401

    from kvswitch.config import AgentSettings
    from kvswitch.node.agent import NodeAgent
    from kvswitch.policy.model import NamespaceInfo, PodInfo, Policy

    gc.collect()
    idle = rss_mib()[0]
    agent = NodeAgent(AgentSettings(node_name=NODE))
    if trace:
        tracemalloc.start(1)
    t0 = time.perf_counter()
    counts = {"pod": 0, "namespace": 0, "policy": 0}
    raw_bytes = 0
    for kind, obj in cluster(pods, namespaces, policies):
        text = json.dumps(obj)  # what the watch stream carries ...
        raw_bytes += len(text)
        raw = json.loads(text)  # ... and what the handler gets
        meta = raw["metadata"]
        key = f"{meta.get('namespace', '')}/{meta['name']}"
        if kind == "pod":
            agent.set_pod(key, PodInfo.parse(raw))
        elif kind == "namespace":
            agent.set_namespace(meta["name"], NamespaceInfo.parse(raw))
        else:
            agent.set_policy(key, Policy.parse(raw))
        counts[kind] += 1
    flows = len(agent.policy.flows())
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"idle": idle, "counts": counts, "flows": flows, "load_s": load_s, "raw": raw_bytes}
    if trace:
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        top = snap.statistics("lineno")
        out["traced"] = sum(s.size for s in top)
        out["top"] = [(str(s.traceback[0]).replace(os.getcwd() + "/", ""), s.size, s.count) for s in top[:12]]
    gc.collect()
    out["rss"], out["hwm"] = rss_mib()
    if not trace:  # after the RSS: its 20k event texts would stay in the heap's high-water mark
        out["core_us"] = core_events(agent, PodInfo, pods, namespaces)
    return out


def core_events(agent: Any, pod_info: Any, pods: int, namespaces: int, n: int = 20_000) -> float:
    """CPU microseconds an event costs the agent's own part: the watch JSON parsed, the handler's
    PodInfo.parse and set_pod, and every 20 events the policy loop's incremental flows (what
    apply_policy hands the reconciler). Creates (then their IP), relabels in and out of the node's
    peer sets, deletes, in the namespaces the node's policies read."""
    import random

    rng = random.Random(3)
    per_ns = pods // namespaces
    peer_ns = [
        i for i in range(LOCAL_PODS // per_ns + 1, namespaces) if 1 <= i % 50 <= LOCAL_PODS // per_ns + 1
    ]
    texts = []
    for serial in range(n // 2):
        obj = pod_object(
            rng.choice(peer_ns), rng.randrange(per_ns), 10_000_000 + serial, "node-7", pod_ip(serial + 60000)
        )
        if serial % 3 == 2:
            obj["metadata"]["labels"]["app"] = rng.choice(["app-1", "app-3"])
        texts.append(json.dumps({"type": "ADDED", "object": obj}))
        texts.append(json.dumps({"type": "DELETED" if serial % 5 == 4 else "MODIFIED", "object": obj}))
    gc.collect()
    t0 = time.process_time()
    for i, text in enumerate(texts):
        event = json.loads(text)
        obj = event["object"]
        meta = obj["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        agent.set_pod(key, None if event["type"] == "DELETED" else pod_info.parse(obj))
        if i % 20 == 19:
            agent.policy.flow_changes()
            agent.policy.installed()
    return (time.process_time() - t0) / len(texts) * 1e6


def informer_records(pods: int, namespaces: int, policies: int) -> float:
    """MiB the informers (kvswitch.handlers.informer) keep for the cluster: each object's key and
    resourceVersion, recorded as a listing records them."""
    from kvswitch.handlers.informer import key_of

    held: dict[str, dict[str, str]] = {"pod": {}, "namespace": {}, "policy": {}}
    gc.collect()
    before = rss_mib()[0]
    for kind, obj in cluster(pods, namespaces, policies):
        raw = json.loads(json.dumps(obj))
        held[kind][key_of(raw)] = raw["metadata"]["resourceVersion"]
        del raw
    gc.collect()
    return rss_mib()[0] - before


def _child(args: argparse.Namespace, what: str) -> Any:
    sizes = ["--pods", str(args.pods), "--namespaces", str(args.namespaces), "--policies", str(args.policies)]
    out = subprocess.run(
        [sys.executable, __file__, "--child", what, *sizes], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(args: argparse.Namespace) -> None:
    m = _child(args, "memory")
    held = _child(args, "informers")
    traced = _child(args, "trace")
    c = m["counts"]
    print(
        f"1. memory: one agent holding {c['pod']} pods, {c['namespace']} namespaces, {c['policy']} policies "
        f"({m['raw'] / MIB:.0f} MiB of watch JSON), {m['flows']} policy flows for its {LOCAL_PODS} pods"
    )
    print(
        f"   RSS {m['rss']:.0f} MiB (peak {m['hwm']:.0f}); of it the idle agent (imports) "
        f"{m['idle']:.0f} MiB, the cluster {m['rss'] - m['idle']:.0f} MiB; loaded in {m['load_s']:.1f} s"
    )
    print(
        f"   goal <= 250 MiB (Cilium: 438 MiB)   ratio {m['rss'] / 250:.2f}; in the real agent besides: "
        f"the informers' key and resourceVersion of each object ({sum(c.values())}) {held:.0f} MiB "
        f"-> {m['rss'] + held:.0f} MiB"
    )
    core = m["core_us"]
    print(
        f"   the agent's own part of a pod event (parse, set_pod, incremental flows every 20 events): "
        f"{core:.0f} us of CPU, {1e6 / core:.0f} events/s on one core"
    )
    print(f"   biggest allocation sites (tracemalloc, {traced['traced'] / MIB:.0f} MiB traced):")
    for where, size, count in traced["top"]:
        print(f"     {size / MIB:7.1f} MiB {count:>9} blocks  {where}")


# --- 2 and 3: a real agent process, through the fake API server's watch -------------------------

BR = "k-vswitch0"
POLICY_PRIORITIES = {"100", "110", "200", "250"}  # isolation, a rule's counters, conjunctions, plain allows


def _creatable(obj: dict[str, Any]) -> dict[str, Any]:
    """What a client sends: no server fields; no owner either (the API's garbage collector would
    delete a pod whose ReplicaSet it does not hold)."""
    drop = ("uid", "resourceVersion", "creationTimestamp", "ownerReferences")
    return {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k not in drop}}


RESOURCES = {"namespace": "v1/namespaces", "pod": "v1/pods", "policy": "networking.k8s.io/v1/networkpolicies"}


def _apply(api: Any, batch: list[tuple[str, str, Any]]) -> None:
    """Store operations in the server's loop, a batch at a time: ("create", kind, object),
    ("status", "pod", object), ("labels", "pod", (namespace, name, labels)), ("delete", "pod",
    (namespace, name))."""
    server = api.server

    def run() -> None:
        for op, kind, arg in batch:
            resource = RESOURCES[kind]
            if op == "create":
                server.emulator.create_object(
                    server.emulator.spec(resource), _creatable(arg), arg["metadata"].get("namespace")
                )
            elif op == "status":
                meta = arg["metadata"]
                server.patch(
                    resource, meta["name"], {"status": arg["status"]}, meta["namespace"], subresource="status"
                )
            elif op == "labels":
                ns, name, labels = arg
                server.patch(resource, name, {"metadata": {"labels": labels}}, ns)
            else:
                ns, name = arg
                server.delete(resource, name, ns)

    api.call(run)


def policy_dump(node: Any, text: str | None = None) -> list[tuple[int, int, str, str]]:
    """The node's policy flows in OVS (or in a dump of them): (table, priority, match, actions)."""
    from kvswitch.ovs.flows import parse_dump
    from kvswitch.ovs.pipeline import Table

    names = ("INGRESS", "EGRESS", "EGRESS_METRIC", "INGRESS_METRIC")  # the metric tables: per-rule counters
    tables = {int(getattr(Table, name)) for name in names if hasattr(Table, name)}
    if text is None:
        text = node.ovs.ofctl("dump-flows", "--no-stats", BR).stdout
    return [
        (f.table, f.priority, f.match, f.actions)
        for f in parse_dump(text)
        if f.table in tables and str(f.priority) in POLICY_PRIORITIES
    ]


def normalized(flows: list[tuple[int, int, str, str]]) -> set[tuple[Any, ...]]:
    """Flows with each conjunction id replaced by where it takes part (its dimensions' matches),
    so two flow sets built with different ids compare."""
    import re

    conj = re.compile(r"conjunction\((\d+),(\d+)/(\d+)\)")
    where: dict[str, list[tuple[int, str, str]]] = {}
    for table, _, match, actions in flows:
        for cid, k, n in conj.findall(actions):
            where.setdefault(cid, []).append((table, match, f"{k}/{n}"))
    sig = {cid: tuple(sorted(w)) for cid, w in where.items()}
    out = set()
    for table, prio, match, actions in flows:
        m = re.search(r"conj_id=(\d+)", match)
        key = (table, prio, ("conj", sig.get(m.group(1))) if m else match)
        acts = tuple(sorted((sig.get(c), f"{k}/{n}") for c, k, n in conj.findall(actions))) or actions
        out.add((key, acts))
    return out


def expected_flows(api: Any) -> set[tuple[Any, ...]]:
    """What a fresh computation from the API's current objects gives for the node (canonical text)."""
    from kvswitch.ovs.flows import Canonicalizer
    from kvswitch.policy.compute import PolicyState
    from kvswitch.policy.flows import ConjIds, policy_flows
    from kvswitch.policy.model import NamespaceInfo, PodInfo, Policy

    pods = [PodInfo.parse(p) for p in api.list_objects("v1/pods")]
    state = PolicyState.build(
        pods,
        [NamespaceInfo.parse(n) for n in api.list_objects("v1/namespaces")],
        [Policy.parse(p) for p in api.list_objects("networking.k8s.io/v1/networkpolicies")],
    )
    local = [p for p in pods if p.node == NODE and p.ip]
    flows = policy_flows(state.compute(namespaces={p.namespace for p in local}), local, ConjIds())
    canon = Canonicalizer().canonical(flows)
    return normalized(
        [(f.table, f.priority, *canon[(f.table, f.priority, f.match, f.actions)]) for f in flows]
    )


def wait_for(what: str, check: Any, timeout: float, interval: float = 0.05) -> float:
    """Seconds until ``check()`` holds."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - t0


def wait_idle(pid: int, timeout: float = 1200) -> tuple[float, float]:
    """Wait until a process uses under 10 % of a core for 2 s; (seconds waited, CPU seconds used)."""
    t0, cpu0 = time.monotonic(), cpu_seconds(pid)
    last = cpu0
    quiet = 0
    while quiet < 2 and time.monotonic() - t0 < timeout:
        time.sleep(1.0)
        now = cpu_seconds(pid)
        quiet = quiet + 1 if now - last < 0.1 else 0
        last = now
    return time.monotonic() - t0 - 2, last - cpu0


def rounds(node: Any) -> set[int]:
    import re

    from kvswitch.ovs.pipeline import cookie_round

    text = node.ovs.ofctl("dump-flows", "--no-stats", BR).stdout
    return {cookie_round(int(c, 16)) for c in re.findall(r"cookie=(0x[0-9a-f]+)", text)}


def start_agent_timed(c: Any, node: Any, old: set[int], timeout: float = 300) -> float:
    """Start the node's agent; seconds from the process start until every flow is of a new round."""
    t0 = time.monotonic()
    c.start_agent(node)
    wait_for("new flow round", lambda: bool(r := rounds(node)) and r.isdisjoint(old), timeout, 0.05)
    return time.monotonic() - t0


def real_agent(args: argparse.Namespace) -> None:
    import signal

    from kvswitch_testbed.cluster import Cluster

    per_ns = args.pods // args.namespaces
    objects = list(cluster(args.pods, args.namespaces, args.policies))
    with Cluster(nodes=1) as c:
        try:
            node = c.bed.nodes[NODE]
            agent = f"agent-{NODE}"
            api = c.api
            assert api is not None
            # The node's 110 pods, wired by the CNI, in namespaces ns-0 .. ns-10.
            _apply(
                c.api,
                [
                    ("create", k, o)
                    for k, o in objects
                    if k == "namespace"
                    and o["metadata"]["name"] in {f"ns-{i}" for i in range(LOCAL_PODS // per_ns + 1)}
                ],
            )
            t0 = time.monotonic()
            local = [o for k, o in objects if k == "pod" and o["spec"]["nodeName"] == NODE]
            for obj in local:
                meta = obj["metadata"]
                cp = c.add_pod(
                    node, meta["name"], meta["namespace"], meta["labels"], obj["spec"]["containers"]
                )
                obj["status"]["podIP"] = cp.ip
            wired = time.monotonic() - t0
            print(f"2. a real agent (k-vswitchd) on {NODE}: its {len(local)} pods wired in {wired:.0f} s")
            # The rest of the cluster while the agent is down; it lists everything when it starts.
            c.processes[agent].stop(signal.SIGKILL)
            old = rounds(node)
            t0 = time.monotonic()
            batch: list[tuple[str, str, Any]] = []
            for kind, obj in objects:
                if kind == "pod" and obj["spec"]["nodeName"] == NODE:
                    continue
                if kind == "namespace" and api.get("v1/namespaces", obj["metadata"]["name"]) is not None:
                    continue
                batch.append(("create", kind, obj))
                if kind == "pod":
                    batch.append(("status", kind, obj))
                if len(batch) >= 1000:
                    _apply(c.api, batch)
                    batch = []
            _apply(c.api, batch)
            # The fake API server runs in a thread of this process, whose heap now holds the cluster
            # several times over: keep the cyclic collector from scanning it again and again (its
            # full collections stall the server's thread, and with it what the agent waits for).
            gc.collect()
            gc.freeze()
            print(
                f"   the API holds {args.pods} pods, {args.namespaces} namespaces, {args.policies} policies "
                f"(loaded in {time.monotonic() - t0:.0f} s)"
            )
            t0 = time.monotonic()
            with urllib_open(api.url + "/api/v1/pods") as resp:
                size = len(resp.read())
            list_s = time.monotonic() - t0
            first = start_agent_timed(c, node, old)
            want = expected_flows(c.api)
            settle = wait_for("flows as computed", lambda: normalized(policy_dump(node)) == want, 120, 0.2)
            pid = c.processes[agent].popen.pid
            print(
                f"   start with the cluster: every flow of the new round in {first:.1f} s "
                f"({len(want)} policy flows; the fake API serves the pod list, {size / MIB:.0f} MiB, "
                f"in {list_s:.1f} s), as computed {settle:.1f} s later"
            )
            busy, cpu = wait_idle(pid)
            rss, hwm = rss_mib(pid)
            print(
                f"   then busy until idle (kopf's and the informers' watches settling): {busy:.0f} s, "
                f"{cpu:.0f} s of CPU"
            )
            print(
                f"   agent RSS {rss:.0f} MiB (peak {hwm:.0f})   goal <= 250 MiB (Cilium: 438 MiB)   "
                f"ratio {rss / 250:.2f}"
            )
            want = churn(args, c, node, objects)
            cold_start(args, c, node, local, want)
        finally:
            if args.logs:
                with open(args.logs, "w") as out:
                    for p in c.processes.values():
                        out.write(f"--- {p.name}\n" + p.log.read_text(errors="replace"))


def urllib_open(url: str) -> Any:
    import urllib.request

    return urllib.request.urlopen(url, timeout=300)


def churn(
    args: argparse.Namespace, c: Any, node: Any, objects: list[tuple[str, dict[str, Any]]]
) -> set[tuple[Any, ...]]:
    """args.rate pod events per second for args.seconds: creates, relabels (in and out of the
    node's peer sets) and deletes in the namespaces the node's policies read."""
    import random

    rng = random.Random(7)
    per_ns = args.pods // args.namespaces
    # the node's policies (ns-0 .. ns-10) read app-3 pods of teams 1 .. 11: namespaces i % 50 in 1..11
    peer_ns = [
        i for i in range(LOCAL_PODS // per_ns + 1, args.namespaces) if 1 <= i % 50 <= LOCAL_PODS // per_ns + 1
    ]
    existing = [
        (o["metadata"]["namespace"], o["metadata"]["name"])
        for k, o in objects
        if k == "pod"
        and o["spec"]["nodeName"] != NODE
        and int(o["metadata"]["namespace"][3:]) in set(peer_ns)
    ]
    created: list[tuple[str, str]] = []
    serial = 10_000_000
    tick = 0.01
    per_tick = max(1, int(args.rate * tick))
    ticks: list[list[tuple[str, str, Any]]] = []  # generated first: the timed loop only writes
    for _ in range(int(args.seconds / tick)):
        batch: list[tuple[str, str, Any]] = []
        while len(batch) < per_tick:
            r = rng.random()
            if r < 0.4 or not (created or existing):  # a pod is created, then gets its IP
                ip = pod_ip(serial % 60000 + 60000)
                obj = pod_object(
                    rng.choice(peer_ns), rng.randrange(per_ns), serial, f"node-{2 + serial % 999}", ip
                )
                serial += 1
                batch += [("create", "pod", obj), ("status", "pod", obj)]
                created.append((obj["metadata"]["namespace"], obj["metadata"]["name"]))
            elif r < 0.7:  # in or out of the node's peer sets
                ns, name = rng.choice(created or existing)
                batch.append(("labels", "pod", (ns, name, {"app": rng.choice(["app-1", "app-3"])})))
            else:
                pool = created if created and (rng.random() < 0.7 or not existing) else existing
                ns, name = pool.pop(rng.randrange(len(pool)))
                batch.append(("delete", "pod", (ns, name)))
        ticks.append(batch)
    events = 0
    pid = c.processes[f"agent-{NODE}"].popen.pid
    cpu0 = cpu_seconds(pid)
    t_start = time.monotonic()
    next_tick = t_start
    for batch in ticks:
        _apply(c.api, batch)
        events += len(batch)
        next_tick += tick
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    t_end = time.monotonic()
    rate = events / (t_end - t_start)
    # The node's flows every 50 ms; the reference is computed once the agent is idle (in this
    # process, it would hold back the fake API server's thread and the dumps while events are due).
    with Snapshots(node) as snaps:
        wait_idle(pid, timeout=300)
        cpu = cpu_seconds(pid) - cpu0
        want = expected_flows(c.api)
        try:
            wait_for("flows as computed after the churn", lambda: snaps.last() == want, 300, 0.05)
            lag = f"{snaps.converged_at(want) - t_end:.2f} s"
        except TimeoutError:
            lag = "not within 300 s"
    print(
        f"   event throughput: {events} pod events in {t_end - t_start:.1f} s through the watch "
        f"({rate:.0f}/s; goal {args.rate}/s); the node's flows as a fresh computation gives them "
        f"{lag} after the last event   goal <= 1 s"
    )
    print(
        f"   the agent used {cpu:.1f} s of CPU for them: {cpu / events * 1000:.2f} ms an event "
        f"(the informer's decoding and the handlers; at {args.rate}/s: {cpu / events * args.rate:.1f} cores)"
    )
    return want


class Snapshots:
    """Dumps of the node's policy flows every ``interval`` in a thread, with their times."""

    def __init__(self, node: Any, interval: float = 0.05) -> None:
        import threading

        self.node, self.interval = node, interval
        self.taken: list[tuple[float, str]] = []  # raw dumps: parsed afterwards, not while events are due
        self._parsed: dict[str, set[tuple[Any, ...]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            self.taken.append((t, self.node.ovs.ofctl("dump-flows", "--no-stats", BR).stdout))
            self._stop.wait(self.interval)

    def last(self) -> set[tuple[Any, ...]] | None:
        return self._normalized(self.taken[-1][1]) if self.taken else None

    def _normalized(self, text: str) -> set[tuple[Any, ...]]:
        if text not in self._parsed:
            self._parsed[text] = normalized(policy_dump(self.node, text))
        return self._parsed[text]

    def converged_at(self, want: set[tuple[Any, ...]]) -> float:
        """When the flows became ``want`` and stayed so."""
        at = self.taken[-1][0]
        for t, flows in reversed(self.taken):
            if self._normalized(flows) != want:
                break
            at = t
        return at

    def __enter__(self) -> Snapshots:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cold_start(
    args: argparse.Namespace, c: Any, node: Any, local: list[dict[str, Any]], want: set[tuple[Any, ...]]
) -> None:
    """Kill -9 the agent and start it again, a ping stream between two of the node's pods meanwhile:
    first with its warm-start cache as it saved it (the agent saves its inputs 2 s after the last
    change it installed), then without it (the cluster-wide lists first), in the same run."""
    fronts = [
        c.pods[(o["metadata"]["namespace"], o["metadata"]["name"])]
        for o in local
        if o["metadata"]["labels"]["tier"] == "front"
    ]
    cache = c.node_dir(node) / "policy-inputs.cache"
    results = []
    for warm in (True, False):
        # idle, then 3 s more: the agent saved what it installed last (2 s after it)
        wait_idle(c.processes[f"agent-{NODE}"].popen.pid)
        time.sleep(3.0)
        assert cache.exists(), "the agent saved no warm-start cache"
        if not warm:
            cache.unlink()
        took, sent, lost, log = restart_under_ping(c, node, fronts[0], fronts[1])
        complete = normalized(policy_dump(node)) == want
        if not complete:  # (the lists, after a warm start, may still be on their way)
            complete = (
                wait_for("flows as computed", lambda: normalized(policy_dump(node)) == want, 60, 0.2) >= 0
            )
        used = "warm start:" in log
        results.append((warm, took, sent, lost, complete, used))
    rss, hwm = rss_mib(c.processes[f"agent-{NODE}"].popen.pid)
    (_, warm_s, sent, lost, complete, used), (_, cold_s, sent2, lost2, complete2, used2) = results
    print(
        f"3. cold start: kill -9, k-vswitchd started again on {NODE} ({len(local)} pods, {args.pods} in the "
        f"cluster): every flow of the new round in, the old round gone after"
    )
    print(
        f"   {warm_s:.2f} s with its warm-start cache (used: {used})   goal <= 5 s   ratio {warm_s / 5:.2f}"
    )
    print(f"   {cold_s:.2f} s without it (lists first; used: {used2})   warm/without {warm_s / cold_s:.2f}")
    print(
        f"   ping stream between two of its pods (100/s): {sent} sent, {lost} lost with the cache; "
        f"{sent2} sent, {lost2} lost without   goal 0 lost"
    )
    print(
        f"   policy flows then as computed: {complete} / {complete2}; agent RSS after the restarts "
        f"{rss:.0f} MiB (peak {hwm:.0f})"
    )


def restart_under_ping(c: Any, node: Any, src: Any, dst: Any) -> tuple[float, int, int, str]:
    """(seconds to the new round, pings sent, pings lost, the new agent's log)."""
    import re
    import signal

    from kvswitch_testbed.netns import in_netns

    agent = f"agent-{NODE}"
    # 1,500 pings (15 s at 100/s, more when the machine is busy): they span the restart, and each
    # is answered or timed out before ping counts it (interrupted, the one in flight counts lost)
    ping = subprocess.Popen(
        in_netns(["ping", "-n", "-q", "-c", "1500", "-i", "0.01", "-W", "1", dst.ip], src.netns),
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    old = rounds(node)
    c.processes[agent].stop(signal.SIGKILL)
    logged = c.processes[agent].log.stat().st_size  # (the log file is appended to)
    took = start_agent_timed(c, node, old)
    out = ping.communicate(timeout=300)[0]
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    sent, got = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    with c.processes[agent].log.open("rb") as f:
        f.seek(logged)
        return took, sent, sent - got, f.read().decode(errors="replace")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=50_000)
    ap.add_argument("--namespaces", type=int, default=5_000)
    ap.add_argument("--policies", type=int, default=10_000)
    ap.add_argument("--sections", default="123")
    ap.add_argument("--rate", type=int, default=1000, help="pod events per second in the churn")
    ap.add_argument("--seconds", type=float, default=10.0, help="how long the churn lasts")
    ap.add_argument("--logs", help="copy the agent's and controller's logs to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "memory":
        print(json.dumps(load_agent(args.pods, args.namespaces, args.policies, trace=False)))
        return
    if args.child == "trace":
        print(json.dumps(load_agent(args.pods, args.namespaces, args.policies, trace=True)))
        return
    if args.child == "informers":
        print(json.dumps(informer_records(args.pods, args.namespaces, args.policies)))
        return
    if "1" in args.sections:
        memory(args)
    if "2" in args.sections or "3" in args.sections:
        real_agent(args)


if __name__ == "__main__":
    main()
