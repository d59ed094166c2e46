"""kvswitchctl trace / flows / policy on a real 2-node cluster (API server, controller and agents as
processes, real OVS, pods wired by k-vswitch-cni): every verdict kind the trace gives is checked
against what real packets do on the same path.

    node1: client (app=client), other (app=other), locked (app=locked, egress-isolated)
    node2: web (app=web): ingress only from app=client on TCP 80
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kvswitch_testbed.bed import run_workdir
from kvswitch_testbed.cluster import Cluster, ClusterPod
from kvswitch_testbed.netns import netns_socket, run
from kvswitch_testbed.probes import EchoServer, LoopThread, ping

from kvswitch.cli.context import sandbox_dir
from tests.conftest import register_run

NP = "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies"
KVSWITCHCTL = str(Path(sys.executable).parent / "kvswitchctl")
SPOOFED = "10.244.1.250"
NOWHERE = "10.244.77.9"  # inside the cluster CIDR, in no node's pod CIDR


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


class Bed:
    def __init__(self, cluster: Cluster, probes: LoopThread) -> None:
        self.c = cluster
        self.probes = probes
        self.pods: dict[str, ClusterPod] = {}

    @property
    def run_id(self) -> str:
        return self.c.bed.run_id

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [KVSWITCHCTL, *args, "--sandbox", self.run_id], capture_output=True, text=True, timeout=60
        )
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def ctl_json(self, *args: str) -> Any:
        return json.loads(self.ctl(*args, "-o", "json").stdout)

    def trace(self, src: str, dst: str, *args: str) -> Any:
        return self.ctl_json("trace", "--from", f"default/{src}", "--to", dst, *args)

    def ip(self, pod: str) -> str:
        return self.pods[pod].ip

    def flows(self, node: str, table: int) -> str:
        return (
            self.c.bed.nodes[node]
            .ovs.ofctl("dump-flows", "--no-stats", "k-vswitch0", f"table={table}")
            .stdout
        )


def tcp_reaches(src: ClusterPod, ip: str, port: int, bind: str | None = None, timeout: float = 1.0) -> bool:
    """A real TCP handshake and one echoed payload from inside ``src``'s namespace."""
    sock = netns_socket(src.netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        if bind:
            sock.bind((bind, 0))
        sock.connect((ip, port))
        sock.sendall(b"ping")
        return sock.recv(4) == b"ping"
    except OSError:
        return False
    finally:
        sock.close()


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    c = Cluster(nodes=2, overlay="vxlan")
    register_run(c.bed.run_id)
    with c, LoopThread() as probes:
        b = Bed(c, probes)
        n1, n2 = c.bed.nodes["node1"], c.bed.nodes["node2"]
        for name, node in (("client", n1), ("other", n1), ("locked", n1), ("web", n2)):
            b.pods[name] = c.add_pod(node, name, labels={"app": name})
        servers = [probes.run(EchoServer(b.pods[p].netns, b.ip(p), 80).start()) for p in ("web", "other")]
        c.client.create(NP, {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "web-ingress", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                  "ports": [{"protocol": "TCP", "port": 80}]}]},
        })  # fmt: skip
        c.client.create(NP, {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "locked-egress", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "locked"}}, "policyTypes": ["Egress"],
                     "egress": [{"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]}]},
        })  # fmt: skip
        wait_for(
            "web's ingress isolation on node2",
            lambda: f"nw_dst={b.ip('web')} actions=drop" in b.flows("node2", 60),
        )
        wait_for(
            "locked's egress isolation",
            lambda: f"nw_src={b.ip('locked')} actions=drop" in b.flows("node1", 40),
        )
        try:
            yield b
        finally:
            for s in servers:
                probes.run(s.stop())


def test_sandbox_layout_is_the_test_kits() -> None:
    assert sandbox_dir("abc123") == run_workdir("abc123")


def test_allowed_names_the_rule_and_packets_agree(bed: Bed) -> None:
    t = bed.trace("client", "default/web", "--dport", "80")
    v = t["verdict"]
    assert (v["result"], v["reason"], v["node"]) == ("delivered", "allowed", "node2"), v
    assert v["allowedBy"] == [{"policy": "default/web-ingress", "direction": "ingress", "rule": 0}]
    assert [h["node"] for h in t["nodes"]] == ["node1", "node2"]
    assert t["nodes"][0]["outcome"] == "tunnel" and t["nodes"][1]["outcome"] == "delivered"
    first = [s["tableName"] for s in t["nodes"][0]["steps"] if s["depth"] == 0]
    assert first[:3] == ["CLASSIFIER", "SPOOF_GUARD", "CONNTRACK"] and "EGRESS" in first
    ingress = next(s for s in t["nodes"][1]["steps"] if s["tableName"] == "INGRESS")
    assert ingress["match"].startswith("conj_id=") and ingress["owner"] == "policy"
    assert tcp_reaches(bed.pods["client"], bed.ip("web"), 80)


@pytest.mark.parametrize(("src", "port"), [("other", 80), ("client", 81)])
def test_ingress_isolation_drop_names_the_policy(bed: Bed, src: str, port: int) -> None:
    t = bed.trace(src, "default/web", "--dport", str(port))
    v = t["verdict"]
    assert (v["result"], v["reason"], v["node"], v["table"]) == (
        "dropped",
        "policy-ingress",
        "node2",
        "INGRESS",
    )
    stage = next(s for s in t["policy"] if s["direction"] == "ingress")
    assert stage["how"] == "isolated" and stage["note"] == ""
    assert stage["api"]["isolatingPolicies"] == ["default/web-ingress"] and stage["api"]["allowedBy"] == []
    assert "default/web-ingress" in v["text"]
    if port == 81:  # the server listens on 80 only: the real check is that 80 from client works
        assert tcp_reaches(bed.pods[src], bed.ip("web"), 80)
    else:
        assert not tcp_reaches(bed.pods[src], bed.ip("web"), port)


def test_a_logged_policy_traces_as_an_unlogged_one(bed: Bed) -> None:
    """With the audit log on, the policy's flows also copy the packet to the agent: the trace still
    calls an allowed packet delivered and an isolated one dropped by the policy."""
    path = f"{NP}/web-ingress"
    bed.c.client.patch(path, {"metadata": {"annotations": {"kvswitch.io/log": "true"}}})
    try:
        wait_for(
            "web's logged isolation on node2",
            lambda: f"nw_dst={bed.ip('web')} actions=controller(" in bed.flows("node2", 60),
        )
        allowed = bed.trace("client", "default/web", "--dport", "80")["verdict"]
        assert (allowed["result"], allowed["reason"]) == ("delivered", "allowed"), allowed
        assert allowed["allowedBy"] == [{"policy": "default/web-ingress", "direction": "ingress", "rule": 0}]
        dropped = bed.trace("other", "default/web", "--dport", "80")["verdict"]
        assert (dropped["result"], dropped["reason"], dropped["table"]) == (
            "dropped",
            "policy-ingress",
            "INGRESS",
        )
        assert "default/web-ingress" in dropped["text"]
    finally:
        bed.c.client.patch(path, {"metadata": {"annotations": {"kvswitch.io/log": None}}})
        wait_for(
            "web's isolation unlogged",
            lambda: f"nw_dst={bed.ip('web')} actions=drop" in bed.flows("node2", 60),
        )


def test_egress_isolation_drop_names_the_policy(bed: Bed) -> None:
    t = bed.trace("locked", "default/other", "--dport", "80")
    v = t["verdict"]
    assert (v["result"], v["reason"], v["node"], v["table"]) == (
        "dropped",
        "policy-egress",
        "node1",
        "EGRESS",
    )
    stage = next(s for s in t["policy"] if s["direction"] == "egress")
    assert stage["api"]["isolatingPolicies"] == ["default/locked-egress"]
    assert len(t["nodes"]) == 1  # never reached the tunnel or the destination's pipeline
    assert not tcp_reaches(bed.pods["locked"], bed.ip("other"), 80)
    assert tcp_reaches(bed.pods["client"], bed.ip("other"), 80)  # the same server answers others


def test_spoof_guard(bed: Bed) -> None:
    t = bed.trace("client", "default/web", "--dport", "80", "--src-ip", SPOOFED)
    v = t["verdict"]
    assert (v["result"], v["reason"], v["node"], v["table"]) == (
        "dropped",
        "spoof-guard",
        "node1",
        "SPOOF_GUARD",
    )
    assert SPOOFED in v["text"] and bed.ip("client") in v["text"]
    client = bed.pods["client"]
    run(["ip", "addr", "add", f"{SPOOFED}/32", "dev", "eth0"], client.netns)
    try:
        assert not tcp_reaches(client, bed.ip("web"), 80, bind=SPOOFED)
        assert tcp_reaches(client, bed.ip("web"), 80)
    finally:
        run(["ip", "addr", "del", f"{SPOOFED}/32", "dev", "eth0"], client.netns)


def test_no_route(bed: Bed) -> None:
    t = bed.trace("client", NOWHERE, "--proto", "icmp")
    v = t["verdict"]
    assert (v["result"], v["reason"], v["node"], v["table"]) == ("dropped", "no-route", "node1", "L3_FORWARD")
    assert "10.244.0.0/16" in v["text"]
    assert not bed.probes.run(ping(bed.pods["client"].netns, NOWHERE, timeout=0.5))
    assert bed.probes.run(ping(bed.pods["client"].netns, bed.ip("other")))  # web takes TCP 80 only


@pytest.mark.parametrize("proto", ["udp", "sctp", "icmp"])
def test_other_protocols_trace_through_both_nodes(bed: Bed, proto: str) -> None:
    args = ["--proto", proto] + (["--dport", "80"] if proto != "icmp" else [])
    t = bed.trace("client", "default/web", *args)
    # web's only rule allows TCP 80: everything else from client is dropped by its isolation
    assert (t["verdict"]["result"], t["verdict"]["reason"]) == ("dropped", "policy-ingress"), t["verdict"]
    t = bed.trace("client", "default/other", *args)
    assert t["verdict"]["result"] == "delivered" and t["verdict"]["allowedBy"] == []


def test_text_output_names_tables_and_the_verdict(bed: Bed) -> None:
    out = bed.ctl("trace", "--from", "default/other", "--to", "default/web", "--dport", "80").stdout
    for name in ("CLASSIFIER", "SPOOF_GUARD", "CT_STATE", "EGRESS", "L3_FORWARD", "INGRESS"):
        assert f" {name} " in out, out
    assert "verdict: DROPPED at node2 INGRESS" in out and "default/web-ingress" in out
    assert "pod default/other (port " in out  # the owner of the pod's flows, by name


def test_a_node_that_cannot_be_reached_is_said(bed: Bed) -> None:
    node1 = str(run_workdir(bed.run_id) / "node1")
    kubeconfig = str(run_workdir(bed.run_id) / "kubeconfig.local")
    proc = subprocess.run(
        [KVSWITCHCTL, "trace", "--from", "default/client", "--to", "default/web", "--dport", "80",
         "--node-rundir", f"node1={node1}", "--kubeconfig", kubeconfig, "-o", "json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    t = json.loads(proc.stdout)
    assert t["verdict"]["result"] == "incomplete" and [h["node"] for h in t["nodes"]] == ["node1"]
    assert any("run the same command on node2" in n for n in t["notes"])


def test_flows_shows_the_pods_flows_with_counters(bed: Bed) -> None:
    def drops() -> int:
        data = bed.ctl_json("flows", "--pod", "default/web")
        flow = next(f for f in data["flows"] if f["tableName"] == "INGRESS" and f["actions"] == "drop")
        assert flow["owner"] == "policy" and flow["match"] == f"ip,nw_dst={bed.ip('web')}"
        return int(flow["packets"])

    data = bed.ctl_json("flows", "--pod", "default/web")
    assert data["node"] == "node2" and data["ip"] == bed.ip("web")
    tables = {f["tableName"] for f in data["flows"]}
    assert {"CLASSIFIER", "SPOOF_GUARD", "ARP_RESPONDER", "L3_FORWARD", "INGRESS", "OUTPUT"} <= tables
    assert all(
        bed.ip("web") in f["match"] or f["owner"] == "pod" or "conj_id" in f["match"] for f in data["flows"]
    )
    before = drops()
    assert not tcp_reaches(bed.pods["other"], bed.ip("web"), 80, timeout=0.5)
    after = drops()
    assert after > before
    text = bed.ctl("flows", "--pod", "default/web").stdout
    assert " 60 INGRESS" in text and "packets" in text


def test_policy_stats_counts_each_rules_connections_on_its_node(bed: Bed) -> None:
    def web_rule() -> dict[str, Any]:
        rows = bed.ctl_json("policy-stats", "--policy", "default/web-ingress")
        assert {(r["policy"], r["direction"], r["rule"], r["node"]) for r in rows} == {
            ("default/web-ingress", "ingress", 0, "node2")
        }, rows
        return dict(rows[0])

    before = web_rule()
    for _ in range(3):
        assert tcp_reaches(bed.pods["client"], bed.ip("web"), 80)
    after = web_rule()
    assert after["sessions"] == before["sessions"] + 3
    assert after["packets"] >= before["packets"] + 3 * 6  # handshake, data, echo, FINs
    text = bed.ctl("policy-stats").stdout
    assert re.search(rf"default/web-ingress\s+ingress\s+0\s+node2\s+{after['sessions']}\s", text), text


def test_policy_lists_what_selects_a_pod(bed: Bed) -> None:
    web = bed.ctl_json("policy", "--pod", "default/web")
    assert web["ingress"]["isolated"] and not web["egress"]["isolated"]
    (pol,) = web["ingress"]["policies"]
    assert pol["policy"] == "default/web-ingress"
    (rule,) = pol["rules"]
    assert rule["rule"] == 0 and rule["ports"] == "TCP 80" and rule["resolvedPeers"] == [bed.ip("client")]
    client = bed.ctl_json("policy", "--pod", "default/client")
    assert not client["ingress"]["isolated"]
    assert client["peerOf"] == [
        {"policy": "default/web-ingress", "direction": "ingress", "rule": 0, "targets": ["default/web"]}
    ]
    locked = bed.ctl_json("policy", "--pod", "default/locked")
    assert locked["egress"]["policies"][0]["rules"][0]["resolvedPeers"] == ["192.0.2.0/24"]
    text = bed.ctl("policy", "--pod", "default/web").stdout
    assert "ingress: isolated by 1 policy" in text and "rule 0: from pods {app=client}; TCP 80" in text


def test_unknown_pod_is_an_error(bed: Bed) -> None:
    proc = bed.ctl("trace", "--from", "default/nope", "--to", "default/web", "--dport", "80", check=False)
    assert proc.returncode == 2 and "default/nope not found" in proc.stderr


# --- live mode: a real tagged packet through the real datapath ---------------------------------


def rx_packets(pod: ClusterPod) -> int:
    return int(run(["cat", "/sys/class/net/eth0/statistics/rx_packets"], pod.netns).stdout)


def trace_cookies_left(bed: Bed) -> list[str]:
    from kvswitch.cli.live import TRACE_OWNER
    from kvswitch.ovs.pipeline import cookie_category, owner_hash

    left = []
    for name, node in bed.c.bed.nodes.items():
        for line in node.ovs.ofctl("dump-flows", "k-vswitch0").stdout.splitlines():
            if "cookie=" in line:
                cookie = int(line.split("cookie=")[1].split(",")[0], 16)
                if cookie_category(cookie) == TRACE_OWNER.category and cookie & 0xFFFFFFFFFF == owner_hash(
                    TRACE_OWNER.name
                ):
                    left.append(f"{name}: {line}")
    return left


def live_tables(t: Any) -> list[list[str]]:
    return [[o["tableName"] for o in h["observed"]] for h in t["live"]["hops"]]


def test_live_packet_follows_the_allowed_path_and_is_kept_from_the_pod(bed: Bed) -> None:
    web = bed.pods["web"]
    before = rx_packets(web)
    t = bed.trace("client", "default/web", "--dport", "80", "--live")
    assert t["verdict"]["result"] == "delivered"
    hops = t["live"]["hops"]
    assert [h["node"] for h in hops] == ["node1", "node2"] and all(h["complete"] for h in hops), hops
    node1, node2 = live_tables(t)
    assert node1[:2] == ["CLASSIFIER", "SPOOF_GUARD"]
    assert node1[-4:] == ["L3_FORWARD", "OUTPUT", "EGRESS_METRIC", "INGRESS_METRIC"]
    assert node2[0] == "CLASSIFIER" and node2[-1] == "INGRESS_METRIC"  # crossed the tunnel for real
    assert "followed the traced path to its end, node2 INGRESS_METRIC" in t["live"]["text"]
    assert rx_packets(web) == before  # observed at the output, never handed to the pod
    assert trace_cookies_left(bed) == []


def test_live_packet_is_dropped_where_the_trace_says(bed: Bed) -> None:
    t = bed.trace("other", "default/web", "--dport", "80", "--live")
    assert t["verdict"]["reason"] == "policy-ingress"
    node1, node2 = live_tables(t)
    assert node1[-1] == "INGRESS_METRIC" and node2[-1] == "INGRESS"
    assert "node2 INGRESS" in t["live"]["text"] and t["live"]["text"].endswith(": dropped")
    t = bed.trace("locked", "default/other", "--dport", "80", "--live")
    (only,) = live_tables(t)
    assert only[-1] == "EGRESS" and t["live"]["hops"][0]["complete"]
    assert trace_cookies_left(bed) == []


def test_live_spoofed_packet_stops_at_the_spoof_guard(bed: Bed) -> None:
    t = bed.trace("client", "default/web", "--proto", "udp", "--dport", "53", "--src-ip", SPOOFED, "--live")
    assert t["verdict"]["reason"] == "spoof-guard"
    assert live_tables(t) == [["CLASSIFIER", "SPOOF_GUARD"]]
    out = bed.ctl("trace", "--from", "default/client", "--to", NOWHERE, "--proto", "icmp", "--live").stdout
    assert "live, node1: seen in CLASSIFIER > SPOOF_GUARD > " in out and "L3_FORWARD" in out
    assert "live: the real packet followed the traced path to its end, node1 L3_FORWARD" in out
