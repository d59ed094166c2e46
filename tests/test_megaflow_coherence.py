"""Policy edits reach new connections even when the datapath's megaflow cache could be stale.

OVS's userspace datapath before "dpif-netdev: Fix dpif_netdev_flow_put" (2.17.8, 3.0.5, 3.1.3,
3.2.0; Debian 12 ships 3.1.0) modifies the wrong one of two overlapping megaflows when the
revalidator updates their actions after a flow-table change: the other keeps its old verdict for
as long as packets keep it alive. Our pipeline makes such overlaps easy: every connection that
arrives through the tunnel shares ``in_port`` and ``recirc_id``, so a megaflow that matches one
peer's address exactly (a podSelector rule) and a wider one (no rule on the source) overlap.

The long test drives a seeded history of NetworkPolicy edits between pods that never stop
connecting, judges every probe with the reference evaluator and traces every megaflow after every
change (kvswitch/ovs/coherence.py). On OVS 3.1.0 without the agent's purge it fails within a few
dozen changes; with it (and on a fixed OVS, without it) it passes. The other tests prove that the
check itself can fail, pin the version rule, and check that the purge runs exactly where needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kvswitch_testbed.netns import netns_socket

from kvswitch.ovs import coherence
from kvswitch.ovs.coherence import (
    CoherenceReport,
    Megaflow,
    has_flow_put_fix,
    megaflow_purge_needed,
    parse_dump_flows,
    parse_ovs_version,
)
from tests import policy_reference as ref
from tests.test_policy import PolicyBed, tcp_connect

# The real-OVS tests share one module-scoped bed (and its event loop); the pure ones need neither.
ON_THE_BED = pytest.mark.asyncio(loop_scope="module")

SEED = int(os.environ.get("KVS_MEGAFLOW_SEED", "3"))
STEPS = int(os.environ.get("KVS_MEGAFLOW_STEPS", "60"))
PORTS = (8080, 9090)
VSWITCHD_VERSION = subprocess.run(
    ["ovs-vswitchd", "--version"], capture_output=True, text=True, check=False
).stdout


# --- the version rule (no OVS needed) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "affected"),
    [
        ("ovs-vswitchd (Open vSwitch) 3.1.0", True),  # Debian 12
        ("ovs-vswitchd (Open vSwitch) 3.1.2", True),
        ("ovs-vswitchd (Open vSwitch) 3.1.3", False),
        ("ovs-vswitchd (Open vSwitch) 3.0.4", True),
        ("ovs-vswitchd (Open vSwitch) 3.0.5", False),
        ("ovs-vswitchd (Open vSwitch) 2.17.7", True),
        ("ovs-vswitchd (Open vSwitch) 2.17.8", False),
        ("ovs-vswitchd (Open vSwitch) 2.13.8", True),  # older branches never got it
        ("ovs-vswitchd (Open vSwitch) 3.1.90", True),  # master before the fix
        ("ovs-vswitchd (Open vSwitch) 3.2.0", False),
        ("ovs-vswitchd (Open vSwitch) 3.3.0", False),  # Debian 13, Ubuntu 24.04
        ("ovs-vswitchd (Open vSwitch) 3.5.1", False),
        ("garbage", True),  # unknown: purge (cheap) rather than risk a stale verdict
    ],
)
def test_version_rule(text: str, affected: bool) -> None:
    assert megaflow_purge_needed(text, "netdev") is affected
    assert megaflow_purge_needed(text, "system") is False  # the kernel datapath never had the bug


def test_version_parsing() -> None:
    assert parse_ovs_version("ovs-vswitchd (Open vSwitch) 3.1.0\n") == (3, 1, 0)
    assert parse_ovs_version("ovs-vswitchd (Open vSwitch) 2.17.9-0ubuntu0.22.04.1") == (2, 17, 9)
    assert parse_ovs_version("no version here") is None
    assert has_flow_put_fix((3, 4, 0)) and not has_flow_put_fix((3, 1, 0))


def test_dump_parsing_keeps_keys_actions_and_masks() -> None:
    text = (
        "flow-dump from the main thread:\n"
        "ufid:2264dc13-9f18-4827-aabb-2756ae6b6321, skb_priority(0/0),ct_state(0x21/0x39),"
        "ct_mark(0/0x3),recirc_id(0x3),dp_hash(0/0),in_port(6),packet_type(ns=0,id=0),"
        "eth(src=0a:58:0a:f4:01:02,dst=0a:58:0a:f4:01:03/00:00:00:00:00:00),eth_type(0x0800),"
        "ipv4(src=10.244.1.2,dst=10.244.1.3/255.255.255.0,proto=6,tos=0/0,ttl=64/0,frag=no),"
        "tcp(src=46890/0,dst=9090/0xe000),tcp_flags(0/0), packets:7, bytes:0, used:never, dp:ovs, "
        "actions:set(eth(src=02:6b:76:00:00:01)),ct(commit,zone=1,mark=0x1/0x1),7, "
        "dp-extra-info:miniflow_bits(5,3)\n"
    )
    [flow] = parse_dump_flows(text)
    assert flow.ufid == "2264dc13-9f18-4827-aabb-2756ae6b6321"
    assert flow.in_port == 6 and flow.recirc_id == 3 and flow.packets == 7
    assert flow.actions == "set(eth(src=02:6b:76:00:00:01)),ct(commit,zone=1,mark=0x1/0x1),7"
    assert flow.thread == "the main thread"
    key = flow.trace_key
    assert "ct_state(0x21)" in key and "ct_mark(0)" in key and "tcp(src=46890,dst=9090)" in key
    assert "ipv4(src=10.244.1.2,dst=10.244.1.3,proto=6,tos=0,ttl=64,frag=no)" in key
    assert "dst=0a:58:0a:f4:01:03)" in key and "/" not in key


# --- a bed with servers and clients that never stop connecting ------------------------------------


@dataclass
class Workload:
    """Servers and clients on two nodes. Clients on node2 reach node1's servers through the tunnel:
    those connections share ``in_port`` and ``recirc_id`` on node1, where megaflows can overlap."""

    pbed: PolicyBed
    cluster: ref.Cluster
    servers: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def pairs(self) -> list[tuple[str, str, int]]:
        return [(ip(c), ip(s), port) for c in self.clients for s in self.servers for port in PORTS]

    async def apply(self, policies: list[dict[str, Any]]) -> None:
        self.cluster.policies = policies
        ref.validate_cluster(self.cluster)
        await self.pbed.apply(self.cluster)

    def start_traffic(self, seed: int) -> None:
        """Every pair connects in bursts: a few seconds of new connections every 0.1-0.3 s, then a
        pause long enough for its megaflows to expire (10 s idle). A peer that comes back finds
        whatever megaflows the others kept alive, so flows made under different tables coexist."""
        rng = random.Random(seed)

        async def keep_connecting(src: str, dst: str, port: int, rng: random.Random) -> None:
            netns = self.pbed.pods[src][0]
            loop = asyncio.get_running_loop()
            while not self.stop.is_set():
                until = loop.time() + rng.uniform(2.0, 8.0)
                while loop.time() < until and not self.stop.is_set():
                    await tcp_connect(netns, dst, port, None, timeout=1.5)
                    await asyncio.sleep(rng.uniform(0.1, 0.3))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), rng.uniform(3.0, 14.0))

        for src, dst, port in self.pairs:
            pair_rng = random.Random(rng.random())
            self.tasks.append(asyncio.create_task(keep_connecting(src, dst, port, pair_rng)))

    async def stop_traffic(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)
        self.tasks.clear()
        self.stop = asyncio.Event()

    async def probe_round(self, rng: random.Random, share: float = 0.35) -> list[str]:
        """A fresh connection for a random share of the pairs (probing all of them every time would
        keep every pair's megaflows alive); the ones that disagree with the reference."""

        async def one(src: str, dst: str, port: int) -> str | None:
            got = await tcp_connect(self.pbed.pods[src][0], dst, port, None, timeout=1.5)
            if got == ref.allowed(self.cluster, src, dst, "TCP", port):
                return None
            word = "allowed" if got else "denied"
            return f"{ref.describe(self.cluster, (src, dst, 'TCP', port))} -> datapath says {word}"

        pairs = rng.sample(self.pairs, max(1, round(len(self.pairs) * share)))
        results = await asyncio.gather(*(one(*p) for p in pairs))
        return [r for r in results if r is not None]

    async def coherence(self) -> dict[str, CoherenceReport]:
        nodes = list(self.pbed.bed.nodes.values())
        reports = await asyncio.gather(*(coherence.check_coherence_async(str(n.ovs.workdir)) for n in nodes))
        return {n.name: r for n, r in zip(nodes, reports, strict=True)}


def ip(pod: dict[str, Any]) -> str:
    return str(pod["status"]["podIP"])


def _pod(ns: str, name: str, node: str, app: str, role: str) -> dict[str, Any]:
    ports = [{"containerPort": p, "protocol": "TCP"} for p in PORTS] if app == "srv" else []
    return {
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app, "role": role, "name": name}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports}]},
        "status": {},
    }


async def make_workload(pbed: PolicyBed, tag: str) -> Workload:
    ns_a, ns_b = f"{tag}-a", f"{tag}-b"
    servers = [
        _pod(ns_a, "s0", "node1", "srv", "r0"),
        _pod(ns_b, "s1", "node1", "srv", "r1"),
        _pod(ns_a, "s2", "node2", "srv", "r0"),
    ]
    clients = [
        _pod(ns_a, "c0", "node2", "cli", "r0"),
        _pod(ns_a, "c1", "node2", "cli", "r1"),
        _pod(ns_b, "c2", "node2", "cli", "r0"),
        _pod(ns_b, "c3", "node1", "cli", "r1"),
    ]
    node_ips = {n.name: pbed.gateway_ip(n) for n in pbed.bed.nodes.values()}
    cluster = ref.Cluster(
        namespaces=[
            {"metadata": {"name": ns_a, "labels": {ref.NAMESPACE_NAME_LABEL: ns_a, "team": "blue"}}},
            {"metadata": {"name": ns_b, "labels": {ref.NAMESPACE_NAME_LABEL: ns_b, "team": "red"}}},
        ],
        pods=servers + clients,
        policies=[],
        node_ips=node_ips,
        external=list(ref.DEFAULT_EXTERNAL),
        node_pod_cidrs={n: f"10.244.{pbed.bed.nodes[n].index}.0/24" for n in node_ips},
    )
    for pod in cluster.pods:
        pod["status"]["podIP"] = await pbed.add_pod(pod)
    work = Workload(pbed, cluster, servers, clients)
    for _, dst, port in work.pairs:
        await pbed.server("TCP", dst, port)
    await work.apply([])
    return work


# --- the seeded history of policy edits ----------------------------------------------------------


def _ports(rng: random.Random) -> dict[str, Any]:
    choice = rng.choice(["all", "8080", "9090", "range", "both"])
    ports = {
        "8080": [{"port": 8080}],
        "9090": [{"port": 9090}],
        "range": [{"port": 8000, "endPort": 8999}],
        "both": [{"port": 8080}, {"protocol": "TCP", "port": 9090}],
    }
    return {} if choice == "all" else {"ports": ports[choice]}


def _peer(rng: random.Random, work: Workload, towards: str) -> dict[str, Any]:
    """Peers that make megaflows match the source (or destination) exactly, by prefix, or not at all."""
    pods = work.clients if towards == "clients" else work.servers
    pod = rng.choice(pods)
    third = ip(pod).rsplit(".", 2)[1]
    kind = rng.choice(["name", "role", "app", "ns", "ns+pod", "ip32", "node24", "node25", "cluster-except"])
    if kind == "name":
        return {"podSelector": {"matchLabels": {"name": pod["metadata"]["name"]}}}
    if kind == "role":
        return {"podSelector": {"matchLabels": {"role": rng.choice(["r0", "r1"])}}}
    if kind == "app":
        return {"podSelector": {"matchLabels": {"app": pod["metadata"]["labels"]["app"]}}}
    if kind == "ns":
        return {"namespaceSelector": {"matchLabels": {"team": rng.choice(["blue", "red"])}}}
    if kind == "ns+pod":
        return {"namespaceSelector": {}, "podSelector": {"matchLabels": {"name": pod["metadata"]["name"]}}}
    if kind == "ip32":
        return {"ipBlock": {"cidr": f"{ip(pod)}/32"}}
    if kind == "node24":
        return {"ipBlock": {"cidr": f"10.244.{third}.0/24"}}
    if kind == "node25":
        return {"ipBlock": {"cidr": f"10.244.{third}.0/25"}}
    return {"ipBlock": {"cidr": "10.244.0.0/16", "except": [f"10.244.{third}.0/26"]}}


def random_policy(rng: random.Random, work: Workload, index: int) -> dict[str, Any]:
    """Mostly ingress isolation of node1's servers (the ones clients reach through the tunnel),
    sometimes egress isolation of clients; 0-2 rules of 1-2 peers each, so a server's verdicts flip
    between single peers, groups, everyone and no one."""
    egress = rng.random() < 0.15
    target = rng.choice(work.clients) if egress else rng.choice(work.servers[:2] * 4 + work.servers[2:])
    ns = target["metadata"]["namespace"]
    selector = rng.choice(
        [{"matchLabels": {"name": target["metadata"]["name"]}}] * 6
        + [{"matchLabels": {"app": "cli" if egress else "srv"}}] * 3
        + [{}]
    )
    section, peers_key = ("egress", "to") if egress else ("ingress", "from")
    rules = []
    for _ in range(rng.choice([0, 1, 1, 1, 2])):
        peers = [_peer(rng, work, "servers" if egress else "clients") for _ in range(rng.choice([1, 1, 2]))]
        rules.append({peers_key: peers, **_ports(rng)})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"mf-{index}", "namespace": ns},
        "spec": {"podSelector": selector, "policyTypes": ["Egress" if egress else "Ingress"], section: rules},
    }


def evolve(rng: random.Random, work: Workload, policies: list[dict[str, Any]], index: int) -> str:
    """One edit of the cluster's policies: remove them all (every server open: no rule looks at the
    source), or replace them with one or two new ones. Narrow, open and flipped verdicts follow
    each other within a few changes, the history that leaves stale megaflows on an affected OVS."""
    if policies and rng.random() < 0.35:
        policies.clear()
        return "clear"
    policies.clear()
    policies.extend(random_policy(rng, work, 10 * index + i) for i in range(rng.choice([1, 1, 2])))
    return "replace"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pbed() -> AsyncIterator[PolicyBed]:
    async with PolicyBed.running() as b:
        yield b


def purges(pbed: PolicyBed) -> int:
    return sum(agent.datapath.megaflow_purges for agent in pbed.agents.values())


@ON_THE_BED
async def test_long_history_of_policy_edits_keeps_the_datapath_coherent(pbed: PolicyBed) -> None:
    """The reproduction: on OVS 3.1.0 without the purge this fails (a stale megaflow, and sometimes a
    wrong verdict). Coherence is checked after every change, so a stale flow is caught even when no
    probe happens to meet it."""
    work = await make_workload(pbed, "mf")
    rng = random.Random(SEED)
    policies: list[dict[str, Any]] = []
    history: list[str] = []
    purges_before = purges(pbed)
    work.start_traffic(SEED)
    try:
        await asyncio.sleep(1.0)  # the wide (established-traffic) megaflows come first
        for step in range(STEPS):
            op = evolve(rng, work, policies, step)
            await work.apply(list(policies))
            history.append(f"{step}: {op} -> {[p['metadata']['name'] for p in policies]}")
            await asyncio.sleep(0.3)  # traffic meets the new tables and makes new megaflows
            wrong = await work.probe_round(rng)
            reports = await work.coherence()
            stale = [f"{node}: {i.render()}" for node, r in reports.items() for i in r.incoherent]
            assert not wrong and not stale, (
                f"seed {SEED}, after change {step + 1} ({len(wrong)} wrong verdicts, {len(stale)} stale "
                f"megaflows; OVS {VSWITCHD_VERSION.strip()}):\n"
                + "\n".join(wrong + stale)
                + "\nhistory:\n  "
                + "\n  ".join(history)
            )
            assert all(r.checked > 0 for r in reports.values())  # the check saw megaflows on both nodes
    finally:
        await work.stop_traffic()
        await work.apply([])
    expected = megaflow_purge_needed(VSWITCHD_VERSION, "netdev")
    assert (purges(pbed) > purges_before) is expected  # the remedy ran exactly where it is needed


# --- focused: the smallest history that leaves a stale megaflow --------------------------------------


@ON_THE_BED
@pytest.mark.parametrize("flip", ["isolate", "only-c2"])
async def test_narrow_then_open_then_flipped_verdict(pbed: PolicyBed, flip: str) -> None:
    """c1 (node2) is allowed to s (node1) by name: its megaflow matches its address exactly. All
    policies go: c2's new connections make a wide megaflow (no source in it) next to c1's. Then s
    is isolated (``isolate``) or only c2 may connect (``only-c2``). On OVS 3.1.0 the revalidator's
    update of c1's megaflow lands on c2's wide one, found first by key lookup (its subtable, the
    one of established traffic, is older), and c1's megaflow keeps "allow".

    ``isolate`` leaves the stale megaflow every time (both megaflows get "drop" from the tables, so
    the order the revalidator takes them in does not matter); ``only-c2`` deletes the wide one as
    too wide, and when the revalidator happens to take c1's first, new connections from c1 pass
    although no policy allows them (about every other run)."""
    ns = f"mfx-{flip}"

    def pod(name: str, node: str) -> dict[str, Any]:
        return {
            "metadata": {"name": name, "namespace": ns, "labels": {"name": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": []}]},
            "status": {},
        }

    def only(client: str) -> dict[str, Any]:
        rule = {"from": [{"podSelector": {"matchLabels": {"name": client}}}], "ports": [{"port": 8080}]}
        spec = {"podSelector": {"matchLabels": {"name": "s"}}, "ingress": [rule]}
        return {"metadata": {"name": "only", "namespace": ns}, "spec": spec}

    isolate = {
        "metadata": {"name": "only", "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"name": "s"}}},
    }
    s, other = pod("s", "node1"), pod("other", "node1")
    c0, c1, c2 = pod("c0", "node2"), pod("c1", "node2"), pod("c2", "node2")
    node_ips = {n.name: pbed.gateway_ip(n) for n in pbed.bed.nodes.values()}
    cluster = ref.Cluster(
        namespaces=[{"metadata": {"name": ns, "labels": {ref.NAMESPACE_NAME_LABEL: ns}}}],
        pods=[s, other, c0, c1, c2],
        policies=[],
        node_ips=node_ips,
    )
    for p in cluster.pods:
        p["status"]["podIP"] = await pbed.add_pod(p)
    for dst in (s, other):
        await pbed.server("TCP", ip(dst), 8080)
    stop = asyncio.Event()

    async def connect(src: dict[str, Any], dst: dict[str, Any], pause: float) -> None:
        while not stop.is_set():
            await tcp_connect(pbed.pods[ip(src)][0], ip(dst), 8080, None, timeout=1.5)
            await asyncio.sleep(pause)

    async def apply(policies: list[dict[str, Any]]) -> None:
        cluster.policies = policies
        await pbed.apply(cluster)

    tasks = [asyncio.create_task(connect(c0, other, 0.1))]  # established traffic from the tunnel first
    try:
        await apply([])
        await asyncio.sleep(1.0)
        await apply([only("c1")])
        tasks.append(asyncio.create_task(connect(c1, s, 0.5)))
        await asyncio.sleep(2.0)
        await apply([])
        tasks.append(asyncio.create_task(connect(c2, s, 0.01)))
        await asyncio.sleep(2.0)
        await apply([isolate if flip == "isolate" else only("c2")])
        await asyncio.sleep(2.0)
        node1 = pbed.bed.nodes["node1"]
        report = await coherence.check_coherence_async(str(node1.ovs.workdir))
        verdicts = [await tcp_connect(pbed.pods[ip(c1)][0], ip(s), 8080, None, timeout=1.5) for _ in range(3)]
        expected = ref.allowed(cluster, ip(c1), ip(s), "TCP", 8080)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await apply([])
    assert expected is False
    assert report.checked > 0
    assert report.ok, f"OVS {VSWITCHD_VERSION.strip()}: stale megaflows on node1:\n{report.render()}"
    assert verdicts == [False, False, False], "c1 connected to s although no policy allows it"


# --- the check itself, and the purge only where it is needed ----------------------------------------


def _kvswitchctl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "kvswitchctl"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=False, timeout=120)


def _flows(rundir: str) -> list[Megaflow]:
    with coherence.connect(rundir) as ctl:
        return parse_dump_flows(ctl("dpctl/dump-flows", "-m", "--no-names"))


@ON_THE_BED
async def test_check_reports_a_megaflow_whose_actions_were_changed_behind_the_tables(pbed: PolicyBed) -> None:
    """Plant an incoherent megaflow (dpctl/mod-flow: the datapath changes, the tables and the
    revalidator's record do not): the library check and ``kvswitchctl check-datapath`` report
    exactly that one and fail; a purge makes the datapath coherent again. Any OVS version."""
    work = await make_workload(pbed, "mfp")
    node1 = pbed.bed.nodes["node1"]
    rundir = str(node1.ovs.workdir)
    work.start_traffic(7)
    try:
        await asyncio.sleep(2.0)
        clean = _kvswitchctl("check-datapath", "--rundir", rundir)
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert " 0 incoherent" in clean.stdout
        candidates = [
            f for f in _flows(rundir) if f.recirc_id and f.ufid and "ct(commit" in f.actions and f.packets
        ]
        assert candidates, "no committed connection's megaflow on node1"
        victim = candidates[0]
        held = {f.ufid: f.actions for f in _flows(rundir)}
        with coherence.connect(rundir) as ctl:
            ctl("dpctl/mod-flow", f"ufid:{victim.ufid},{victim.key}", "drop")
        # (an affected OVS may modify an overlapping megaflow instead of the one named: take what changed)
        [planted] = [f for f in _flows(rundir) if f.actions == "drop" and held.get(f.ufid, "drop") != "drop"]
        report = await coherence.check_coherence_async(rundir)
        assert [i.flow.ufid for i in report.incoherent] == [planted.ufid]
        assert report.incoherent[0].expected == held[planted.ufid]  # the tables still say what it did
        cli = _kvswitchctl("check-datapath", "--rundir", rundir)
        assert cli.returncode == 1, cli.stdout + cli.stderr
        assert planted.ufid is not None and planted.ufid in cli.stdout and "tables:" in cli.stdout
        with coherence.connect(rundir) as ctl:
            ctl("revalidator/purge")
        after = _kvswitchctl("check-datapath", "--rundir", rundir)
        assert after.returncode == 0, after.stdout
    finally:
        await work.stop_traffic()
        await work.apply([])


@ON_THE_BED
async def test_purge_follows_flow_changes_only_where_needed(pbed: PolicyBed) -> None:
    """The agents decided from the running vswitchd (3.1.0 here: purge). A policy change then
    empties the megaflow cache; with the decision a fixed OVS gets, the same change leaves the
    cache alone and nothing extra runs."""
    agent = pbed.agents["node1"]
    dp = agent.datapath
    assert dp.ovs_version.startswith("ovs-vswitchd (Open vSwitch)")
    assert dp.megaflow_purge is megaflow_purge_needed(dp.ovs_version, "netdev")
    decided = dp.megaflow_purge
    work = await make_workload(pbed, "mfq")
    rundir = str(pbed.bed.nodes["node1"].ovs.workdir)
    deny = {
        "metadata": {"name": "deny", "namespace": "mfq-a"},
        "spec": {"podSelector": {"matchLabels": {"name": "s0"}}, "policyTypes": ["Ingress"]},
    }
    try:
        for purge in (False, True):
            dp.megaflow_purge = purge
            work.start_traffic(11)
            await asyncio.sleep(3.0)
            await work.stop_traffic()  # quiet: whatever is cached now stays (10 s idle) unless purged
            before = {f.ufid for f in _flows(rundir)}
            count = dp.megaflow_purges
            await work.apply([deny] if not work.cluster.policies else [])
            after = {f.ufid for f in _flows(rundir)}
            assert before
            if purge:
                assert dp.megaflow_purges == count + 1
                assert not before & after, "megaflows from before the change survived the purge"
            else:
                assert dp.megaflow_purges == count
                assert before & after, "megaflows went away although nothing purged them"
    finally:
        dp.megaflow_purge = decided
        await work.stop_traffic()
        await work.apply([])


@ON_THE_BED
async def test_an_open_connection_outlives_a_denying_edit_and_its_purge(pbed: PolicyBed) -> None:
    """Edits judge new connections only (docs/networkpolicy.md): the purge empties the megaflow
    cache, not conntrack, so an open connection's next packets are translated afresh, meet the
    ALLOWED mark and pass, while a new connection is refused."""
    work = await make_workload(pbed, "mfe")
    client, server = work.clients[0], work.servers[0]  # node2 -> node1, through the tunnel
    netns = pbed.pods[ip(client)][0]
    loop = asyncio.get_running_loop()
    sock = netns_socket(netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    purges_before = purges(pbed)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (ip(server), 8080)), 2)
        deny = {
            "metadata": {"name": "deny", "namespace": server["metadata"]["namespace"]},
            "spec": {"podSelector": {"matchLabels": {"name": "s0"}}, "policyTypes": ["Ingress"]},
        }
        await work.apply([deny])
        for i in range(5):
            await loop.sock_sendall(sock, f"after-{i}".encode())
            assert await asyncio.wait_for(loop.sock_recv(sock, 64), 2) == f"after-{i}".encode()
            await asyncio.sleep(0.2)
    finally:
        sock.close()
    try:
        assert not await tcp_connect(netns, ip(server), 8080, None, timeout=1.5)
        assert not ref.allowed(work.cluster, ip(client), ip(server), "TCP", 8080)
        if megaflow_purge_needed(VSWITCHD_VERSION, "netdev"):
            assert purges(pbed) > purges_before  # the open connection lived through a purge
    finally:
        await work.apply([])
