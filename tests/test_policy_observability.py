"""Per-rule NetworkPolicy statistics and the policy audit log, with real packets.

Two in-process agents on real OVS nodes; pods wired by k-vswitch-cni. Counters are checked against
what the pods' own interfaces counted (the kernel's veth statistics), sessions against the number of
connections made; the audit log against the connections made and a flood 10x its meter's rate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kvswitch_testbed.netns import arun, netns_socket
from kvswitch_testbed.probes import tcp_echo
from prometheus_client import REGISTRY

from kvswitch.cli.context import NodeOvs
from kvswitch.cli.policy_stats import node_counters, render, rows
from kvswitch.node.agent import NodeAgent
from kvswitch.policy.flows import rule_id, rule_name
from kvswitch.policy.model import LOG_ANNOTATION, NamespaceInfo, PodInfo, Policy
from kvswitch.policy.stats import RuleCounters, rule_refs
from tests import policy_reference as ref
from tests.test_policy import PolicyBed, _ip, _ns, _pod, _policy

pytestmark = pytest.mark.asyncio(loop_scope="module")
NS = "obs"
AUDIT_RATE = 50  # packets/s the audit meter lets through (the default is 5,000)
LOG_MAX_BYTES = 4096


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def obed() -> AsyncIterator[PolicyBed]:
    async with PolicyBed.running(
        policy_stats_interval=1.0,
        audit_rate=AUDIT_RATE,
        audit_log_max_bytes=LOG_MAX_BYTES,
        audit_log_backups=2,
    ) as b:
        yield b


def _web_in(logged: bool) -> dict[str, Any]:
    p: dict[str, Any] = _policy(
        NS,
        "web-in",
        {
            "podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 8080}]},
                {"from": [{"podSelector": {"matchLabels": {"app": "nobody"}}}], "ports": [{"port": 9999}]},
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                    "ports": [{"port": 5000, "protocol": "UDP"}],
                },
            ],
        },
    )
    if logged:
        p["metadata"]["annotations"] = {LOG_ANNOTATION: "true"}
    return p


CLIENT_OUT = _policy(
    NS,
    "client-out",
    {
        "podSelector": {"matchLabels": {"app": "client"}},
        "policyTypes": ["Egress"],
        "egress": [
            {"to": [{"podSelector": {"matchLabels": {"app": "server"}}}], "ports": [{"port": 8080}]},
            {"ports": [{"port": 5000, "protocol": "UDP"}]},
        ],
    },
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scene(obed: PolicyBed) -> dict[str, Any]:
    pods = {
        "client": _pod(NS, "client", "node1", {"app": "client"}),
        "near": _pod(NS, "near", "node1", {"app": "server"}),  # the client's node
        "far": _pod(NS, "far", "node2", {"app": "server"}),
        "stranger": _pod(NS, "stranger", "node1", {"app": "stranger"}),
    }
    for pod in pods.values():
        pod["status"]["podIP"] = await obed.add_pod(pod)
    cluster = ref.Cluster(
        namespaces=[_ns(NS)],
        pods=list(pods.values()),
        policies=[_web_in(logged=True), CLIENT_OUT],
        node_ips={n.name: obed.gateway_ip(n) for n in obed.bed.nodes.values()},
    )
    await obed.apply(cluster)
    for server in ("near", "far"):
        await obed.server("TCP", _ip(pods[server]), 8080)
    return {"pods": pods, "cluster": cluster}


def netns_of(obed: PolicyBed, pod: dict[str, Any]) -> str:
    return obed.pods[_ip(pod)][0]


async def veth(netns: str) -> RuleCounters:
    """What the pod's eth0 counted, both directions: (0, packets, bytes)."""
    out = await arun(["ip", "-s", "-j", "link", "show", "eth0"], netns)
    stats = json.loads(out.stdout)[0]["stats64"]
    return RuleCounters(
        0, stats["rx"]["packets"] + stats["tx"]["packets"], stats["rx"]["bytes"] + stats["tx"]["bytes"]
    )


def rule(policy: str, ingress: bool, index: int) -> tuple[bool, int]:
    return ingress, rule_id(rule_name(f"{NS}/{policy}", ingress, index))


async def stats(agent: NodeAgent, key: tuple[bool, int]) -> RuleCounters:
    return (await agent.read_policy_stats()).get(key, RuleCounters())


def minus(a: RuleCounters, b: RuleCounters) -> RuleCounters:
    return RuleCounters(a.sessions - b.sessions, a.packets - b.packets, a.bytes - b.bytes)


def within(got: int, want: int, tolerance: float = 0.01) -> bool:
    return abs(got - want) <= tolerance * want


# --- per-rule statistics ---------------------------------------------------------------------


async def test_rule_counters_match_the_connections_and_what_the_pods_interfaces_counted(
    obed: PolicyBed, scene: dict[str, Any]
) -> None:
    pods, node1, node2 = scene["pods"], obed.agents["node1"], obed.agents["node2"]
    client_ns = netns_of(obed, pods["client"])
    for server in ("near", "far"):  # neighbours resolved, nothing else pending on the links
        assert await tcp_echo(client_ns, _ip(pods[server]), 8080)
    await asyncio.sleep(0.5)
    egress, ingress = rule("client-out", False, 0), rule("web-in", True, 0)
    before = {
        "client": await veth(client_ns),
        "near": await veth(netns_of(obed, pods["near"])),
        "far": await veth(netns_of(obed, pods["far"])),
        "egress": await stats(node1, egress),
        "near-in": await stats(node1, ingress),
        "far-in": await stats(node2, ingress),
    }
    connections, size = 12, 48_000
    for _ in range(connections):
        for server in ("near", "far"):
            assert await tcp_echo(client_ns, _ip(pods[server]), 8080, size=size)
    await asyncio.sleep(0.5)  # the last FINs and ACKs
    seen = {
        "client": minus(await veth(client_ns), before["client"]),
        "near": minus(await veth(netns_of(obed, pods["near"])), before["near"]),
        "far": minus(await veth(netns_of(obed, pods["far"])), before["far"]),
        "egress": minus(await stats(node1, egress), before["egress"]),
        "near-in": minus(await stats(node1, ingress), before["near-in"]),
        "far-in": minus(await stats(node2, ingress), before["far-in"]),
    }
    assert seen["client"].bytes > 2 * 2 * connections * size  # the payload went both ways, twice
    # the client's egress rule saw every packet of its 24 connections, both ways, on its node
    assert seen["egress"].sessions == 2 * connections, seen
    assert within(seen["egress"].packets, seen["client"].packets), seen
    assert within(seen["egress"].bytes, seen["client"].bytes), seen
    # the servers' ingress rule, on each server's node
    for server, node in (("near", "near-in"), ("far", "far-in")):
        assert seen[node].sessions == connections, seen
        assert within(seen[node].packets, seen[server].packets), seen
        assert within(seen[node].bytes, seen[server].bytes), seen
    # rules that allowed nothing count nothing
    assert (await stats(node2, rule("web-in", True, 1))).packets == 0


async def test_counters_reach_prometheus_within_ten_seconds(obed: PolicyBed, scene: dict[str, Any]) -> None:
    """Both in-process agents add to this process's counters: they sum over the two nodes."""
    labels = {"namespace": NS, "policy": "web-in", "direction": "ingress", "rule": "0"}

    def sessions() -> float:
        return REGISTRY.get_sample_value("kvswitch_policy_rule_sessions_total", labels) or 0.0

    before = sessions()
    pods = scene["pods"]
    for _ in range(3):
        assert await tcp_echo(netns_of(obed, pods["client"]), _ip(pods["far"]), 8080)
    loop = asyncio.get_running_loop()
    start = loop.time()
    while sessions() < before + 3 and loop.time() - start < 10:
        await asyncio.sleep(0.2)
    assert sessions() == before + 3, "the rule's sessions did not reach the metrics within 10 s"
    packets = REGISTRY.get_sample_value("kvswitch_policy_rule_packets_total", labels)
    assert packets is not None and packets >= sessions()


async def test_the_cli_names_each_rules_counters_per_node(obed: PolicyBed, scene: dict[str, Any]) -> None:
    per_node = {
        name: node_counters(NodeOvs(name, str(node.ovs.workdir), obed.agents[name].settings.bridge))
        for name, node in obed.bed.nodes.items()
    }
    policies = [Policy.parse(p) for p in scene["cluster"].policies]
    data = rows(per_node, rule_refs(policies), f"{NS}/web-in")
    far = next(r for r in data if r["node"] == "node2" and r["direction"] == "ingress" and r["rule"] == 0)
    assert far["sessions"] == (await stats(obed.agents["node2"], rule("web-in", True, 0))).sessions > 0
    assert {r["policy"] for r in data} == {f"{NS}/web-in"}
    text = render(data)
    assert re.search(rf"{NS}/web-in\s+ingress\s+0\s+node2\s+{far['sessions']}\s", text), text


# --- audit log -------------------------------------------------------------------------------


def log_lines(obed: PolicyBed, node: str) -> list[str]:
    path = Path(obed.agents[node].settings.audit_log)
    files = sorted(path.parent.glob(path.name + "*"), key=lambda p: p.stat().st_mtime)
    return [line for f in files for line in f.read_text().splitlines()]


async def settled_lines(obed: PolicyBed, node: str) -> list[str]:
    """The node's log once the writer thread has caught up (nothing new for 0.3 s)."""
    seen = -1
    lines = log_lines(obed, node)
    while len(lines) != seen:
        seen = len(lines)
        await asyncio.sleep(0.3)
        lines = log_lines(obed, node)
    return lines


async def test_allow_and_deny_decisions_of_a_logged_policy_are_logged(
    obed: PolicyBed, scene: dict[str, Any]
) -> None:
    pods = scene["pods"]
    client, far, stranger = (_ip(pods[n]) for n in ("client", "far", "stranger"))
    before = len(await settled_lines(obed, "node2"))
    before_node1 = len(await settled_lines(obed, "node1"))
    assert await tcp_echo(netns_of(obed, pods["client"]), far, 8080)
    assert not await tcp_echo(netns_of(obed, pods["stranger"]), far, 8080, timeout=0.5)
    lines = (await settled_lines(obed, "node2"))[before:]
    allow = [x for x in lines if " ALLOW " in x and f"{client}:" in x]
    deny = [x for x in lines if " DENY " in x and f"{stranger}:" in x]
    assert len(allow) == 1, lines
    assert re.search(
        rf"ALLOW ingress policy={NS}/web-in rule=0 pod={NS}/far TCP {client}:\d+ -> {far}:8080 len=\d+$",
        allow[0],
    )
    assert deny, lines  # the SYN and its retransmissions: one line each
    assert re.search(
        rf"DENY ingress policy={NS}/web-in rule=isolation pod={NS}/far TCP {stranger}:\d+ -> {far}:8080 ",
        deny[0],
    )
    # client-out is not logged: node1, where it allowed the connection, wrote nothing about it
    assert not [x for x in (await settled_lines(obed, "node1"))[before_node1:] if "client-out" in x]


async def test_a_flood_at_ten_times_the_meter_loses_no_packet_and_the_log_stays_bounded(
    obed: PolicyBed, scene: dict[str, Any]
) -> None:
    """New UDP connections (a new source port each) at 10x the audit meter's rate, for 3 s: every
    datagram arrives, the log holds about the meter's share of them, rotated within its size."""
    pods = scene["pods"]
    far, client_ns = _ip(pods["far"]), netns_of(obed, pods["client"])
    received: set[bytes] = set()
    loop = asyncio.get_running_loop()
    sink = netns_socket(netns_of(obed, pods["far"]), socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sink.bind((far, 5000))
    sink.setblocking(False)

    class Sink(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            received.add(data)

    transport, _ = await loop.create_datagram_endpoint(Sink, sock=sink)
    audit = obed.agents["node2"].audit
    await settled_lines(obed, "node2")
    before = audit.lines
    rate, seconds = 10 * AUDIT_RATE, 3.0
    sent: list[bytes] = []
    try:
        start = loop.time()
        while (n := len(sent)) < rate * seconds:
            wait = start + n / rate - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            s = netns_socket(client_ns, socket.AF_INET, socket.SOCK_DGRAM)
            with contextlib.closing(s):
                payload = f"flood-{n}".encode()
                s.sendto(payload, (far, 5000))
                sent.append(payload)
        elapsed = loop.time() - start
        deadline = loop.time() + 3
        while len(received) < len(sent) and loop.time() < deadline:
            await asyncio.sleep(0.05)
    finally:
        transport.close()
    assert received == set(sent), f"{len(sent) - len(received)} of {len(sent)} datagrams lost"
    tail = [x for x in await settled_lines(obed, "node2") if " ALLOW " in x and ":5000 " in x]
    assert tail and re.search(rf"rule=2 pod={NS}/far UDP [\d.]+:\d+ -> {far}:5000 len=\d+$", tail[-1])
    logged = audit.lines - before  # (the files hold only the newest: they rotate)
    bound = AUDIT_RATE * (elapsed + 1) + AUDIT_RATE  # the meter's rate and one burst, with slack
    assert AUDIT_RATE * seconds / 2 <= logged <= bound, (logged, len(sent), elapsed)
    assert audit.dropped == 0
    # rotated: the files stay within their size, the oldest are gone
    path = Path(audit.path)
    files = sorted(path.parent.glob(path.name + "*"))
    assert [f.name for f in files] == [path.name, f"{path.name}.1", f"{path.name}.2"]
    assert all(f.stat().st_size <= LOG_MAX_BYTES for f in files)


async def test_turning_the_annotation_off_stops_the_log(obed: PolicyBed, scene: dict[str, Any]) -> None:
    pods, cluster = scene["pods"], scene["cluster"]
    quiet = ref.Cluster(
        namespaces=cluster.namespaces,
        pods=cluster.pods,
        policies=[_web_in(logged=False), CLIENT_OUT],
        node_ips=cluster.node_ips,
    )
    try:
        await obed.apply(quiet)
        before = len(await settled_lines(obed, "node2"))
        assert await tcp_echo(netns_of(obed, pods["client"]), _ip(pods["far"]), 8080)
        assert len(await settled_lines(obed, "node2")) == before
    finally:
        for agent in obed.agents.values():
            agent.replace_policy_inputs(
                [PodInfo.parse(p) for p in cluster.pods],
                [NamespaceInfo.parse(n) for n in cluster.namespaces],
                [Policy.parse(p) for p in cluster.policies],
            )
            await agent.apply_policy()
