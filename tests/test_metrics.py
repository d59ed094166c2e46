"""Prometheus metrics of the real daemons: a 2-node cluster (API server, controller and agents as
processes, real OVS), each daemon scraped over HTTP inside its own network namespace and parsed with
prometheus_client's parser; the values are checked against what the test did (pods added, a failed
CNI ADD, flows deleted behind the agent's back, ovsdb restarted)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from kvswitch_testbed.cluster import API_IP, Cluster
from kvswitch_testbed.cni_runner import Attachment, PluginFailed
from kvswitch_testbed.netns import netns_socket
from prometheus_client.parser import text_string_to_metric_families

from kvswitch.metrics import AGENT_PORT, CONTROLLER_PORT
from kvswitch.ovs.pipeline import Table
from tests.conftest import register_run

PODS_PER_NODE = 2
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(netns: str, ip: str, port: int) -> tuple[str, Samples]:
    """GET /metrics from inside ``netns``; (content type, samples by name and labels)."""
    sock = netns_socket(netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect((ip, port))
        sock.sendall(f"GET /metrics HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].split()[1] == "200", lines[0]
    ctype = next(
        v.strip() for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-type"
    )
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return ctype, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(nodes=2, overlay="vxlan")
    register_run(c.bed.run_id)
    with c:
        for node in c.bed.nodes.values():
            for i in range(PODS_PER_NODE):
                c.add_pod(node, f"{node.name}-p{i}", labels={"app": f"a{i}"})
        yield c


def agent(c: Cluster, name: str) -> Samples:
    node = c.bed.nodes[name]
    return scrape(node.netns, "127.0.0.1", AGENT_PORT)[1]


def test_agent_exposition_parses_and_counts_the_pods(cluster: Cluster) -> None:
    node = cluster.bed.nodes["node1"]
    ctype, m = scrape(node.netns, node.underlay_ip, AGENT_PORT)
    assert ctype.startswith("text/plain") and "version=" in ctype
    assert value(m, "kvswitch_pods") == PODS_PER_NODE
    # every ADD of this node went through the agent's CNI server
    assert value(m, "kvswitch_cni_request_duration_seconds_count", command="ADD") == PODS_PER_NODE
    assert value(m, "kvswitch_cni_request_duration_seconds_sum", command="ADD") > 0
    # flows per table and owner: each pod has one classifier and two spoof-guard flows (IP, ARP)
    assert value(m, "kvswitch_flows", table="CLASSIFIER", owner="pod") == PODS_PER_NODE
    assert value(m, "kvswitch_flows", table="SPOOF_GUARD", owner="pod") == 2 * PODS_PER_NODE
    assert value(m, "kvswitch_flows", table="L3_FORWARD", owner="remote_node") == 1  # node2's pod CIDR
    assert value(m, "kvswitch_flows", table="SENTINEL", owner="sentinel") == 1
    assert value(m, "kvswitch_ovs_bundle_duration_seconds_count") > 0
    assert value(m, "kvswitch_ovs_bundle_size_count") == value(
        m, "kvswitch_ovs_bundle_duration_seconds_count"
    )
    assert value(m, "kvswitch_ovs_bundle_errors_total") == 0
    assert value(m, "kvswitch_policy_computation_seconds_count") > 0
    resyncs = value(m, "kvswitch_flow_resyncs_total", result="clean") + value(
        m, "kvswitch_flow_resyncs_total", result="repaired"
    )
    assert resyncs >= 1  # the start-up resync that removes the previous round
    assert value(m, "kvswitch_ovsdb_reconnects_total") == 0
    assert value(m, "process_cpu_seconds_total") > 0  # the process collector is there too


def test_flow_counts_follow_the_live_state(cluster: Cluster) -> None:
    """The gauges equal the flows in the bridge, table by table, for what the agent owns."""
    node = cluster.bed.nodes["node2"]
    live = node.ovs.ofctl("dump-flows", "--no-stats", "k-vswitch0").stdout
    per_table: dict[str, int] = {}
    for line in live.splitlines():
        if " actions=" in line:
            t = next((p.split("=")[1] for p in line.split(", ") if p.strip().startswith("table=")), "0")
            per_table[t] = per_table.get(t, 0) + 1
    m = agent(cluster, "node2")
    gauged: dict[str, float] = {}
    for (name, labels), v in m.items():
        if name == "kvswitch_flows":
            table = dict(labels)["table"]
            gauged[table] = gauged.get(table, 0) + v
    for t, n in per_table.items():
        assert gauged.get(Table(int(t)).name) == n, (t, n, gauged)


def test_cni_adds_and_errors_by_code(cluster: Cluster) -> None:
    node = cluster.bed.nodes["node1"]
    before = agent(cluster, "node1")
    cp = cluster.add_pod(node, "extra")
    bad = Attachment(container_id="deadbeef", netns="/var/run/netns/kvs-no-such-netns", ifname="eth0",
                     args="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=ghost")  # fmt: skip
    with pytest.raises(PluginFailed) as failed:
        cluster.conflist(node).add(bad)
    code = str(json.loads(failed.value.run.stdout)["code"])
    try:
        after = agent(cluster, "node1")
        adds = "kvswitch_cni_request_duration_seconds_count"
        assert value(after, adds, command="ADD") == value(before, adds, command="ADD") + 2
        errors = "kvswitch_cni_request_errors_total"
        assert (
            value(after, errors, command="ADD", code=code)
            == value(before, errors, command="ADD", code=code) + 1
        )
        assert value(after, "kvswitch_pods") == value(before, "kvswitch_pods") + 1
    finally:
        cluster.delete_pod(cp)
    wait_for("pods gauge back", lambda: value(agent(cluster, "node1"), "kvswitch_pods") == PODS_PER_NODE)
    m = agent(cluster, "node1")
    assert value(m, "kvswitch_cni_request_duration_seconds_count", command="DEL") >= 1


def test_lost_flows_are_counted_as_a_replay(cluster: Cluster) -> None:
    node = cluster.bed.nodes["node2"]
    before = value(agent(cluster, "node2"), "kvswitch_flow_replays_total")
    node.ovs.ofctl("del-flows", "k-vswitch0")
    wait_for("replay", lambda: value(agent(cluster, "node2"), "kvswitch_flow_replays_total") == before + 1)


def test_ovsdb_restart_is_counted_as_a_reconnect(cluster: Cluster) -> None:
    node = cluster.bed.nodes["node2"]
    pid = node.ovs.ovsdb_pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    wait_for("ovsdb-server gone", lambda: node.ovs.ovsdb_pid is None, 10)
    node.ovs.start()  # the same database again, as a service manager restarts it
    wait_for(
        "reconnect counted", lambda: value(agent(cluster, "node2"), "kvswitch_ovsdb_reconnects_total") >= 1
    )


def test_controller_metrics(cluster: Cluster) -> None:
    ctype, m = scrape(cluster.bed.underlay_ns, API_IP, CONTROLLER_PORT)
    assert ctype.startswith("text/plain")
    assert value(m, "kvswitch_controller_nodes") == 2
    wait_for(
        "both VSwitchConfigs Ready in the controller's view",
        lambda: (
            value(
                scrape(cluster.bed.underlay_ns, API_IP, CONTROLLER_PORT)[1],
                "kvswitch_controller_vswitchconfigs",
                ready="True",
            )
            == 2
        ),
    )
    m = scrape(cluster.bed.underlay_ns, API_IP, CONTROLLER_PORT)[1]
    assert (
        value(m, "kvswitch_controller_events_total", kind="Node", type="ADDED")
        + value(m, "kvswitch_controller_events_total", kind="Node", type="LISTED")
        >= 2
    )
    assert not any(name.startswith("kvswitch_cni_") and v for (name, _), v in m.items())  # agent-only


def test_rule_statistics_and_the_audit_log_of_the_real_agent(cluster: Cluster) -> None:
    """A logged policy on node2's a0 pod: connections from node1's a1 pod are counted per rule in the
    agent's metrics within 10 s (its default 5 s reading) and logged in node2's audit log."""
    src, dst = cluster.pods[("default", "node1-p1")], cluster.pods[("default", "node2-p0")]
    cluster.client.create(
        "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies",
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "a0-in", "namespace": "default", "annotations": {"kvswitch.io/log": "true"}},
            "spec": {
                "podSelector": {"matchLabels": {"app": "a0"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a1"}}}]}],
            },
        },
    )
    labels = {"namespace": "default", "policy": "a0-in", "direction": "ingress", "rule": "0"}
    wait_for(
        "a0-in's isolation on node2",
        lambda: (
            f"nw_dst={dst.ip} actions=controller" in dst.node.ovs.ofctl("dump-flows", "k-vswitch0").stdout
        ),
    )
    server = netns_socket(dst.netns, socket.AF_INET, socket.SOCK_STREAM)
    server.bind((dst.ip, 7070))
    server.listen(8)
    try:
        for _ in range(4):
            client = netns_socket(src.netns, socket.AF_INET, socket.SOCK_STREAM)
            client.settimeout(2)
            with client:
                client.connect((dst.ip, 7070))
                conn, _ = server.accept()
                conn.sendall(b"x" * 1000)
                got = b""
                while len(got) < 1000:
                    got += client.recv(1000)
                conn.close()
        done = time.monotonic()
        wait_for(
            "the rule's 4 sessions in node2's metrics",
            lambda: value(agent(cluster, "node2"), "kvswitch_policy_rule_sessions_total", **labels) == 4,
            timeout=10,
        )
        assert time.monotonic() - done < 10
        m = agent(cluster, "node2")
        assert value(m, "kvswitch_policy_rule_packets_total", **labels) >= 4 * 6
        assert value(m, "kvswitch_policy_rule_bytes_total", **labels) > 4 * 1000
        assert value(m, "kvswitch_policy_audit_lines_total", verdict="allow") == 4
        log = cluster.audit_log(dst.node).read_text().splitlines()
        line = f"ALLOW ingress policy=default/a0-in rule=0 pod=default/node2-p0 TCP {src.ip}:"
        allowed = [x for x in log if line in x]
        assert len(allowed) == 4, log
    finally:
        server.close()
