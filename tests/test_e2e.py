"""End to end: API server + controller + agents (real processes) + real OVS + real packets.

One cluster serves the whole module (it takes seconds to start); tests that disturb it put back
what they changed, and the destructive one (node deletion) runs last.
"""

from __future__ import annotations

import asyncio
import functools
import re
import signal
import socket
import time
from collections.abc import Iterator

import pytest
from kvswitch_testbed import Node
from kvswitch_testbed.cluster import EXTERNAL_IP, Cluster, ClusterPod
from kvswitch_testbed.kubeclient import VSC, ApiError
from kvswitch_testbed.netns import arun, netns_socket, run
from kvswitch_testbed.probes import EchoServer, full_matrix, ping, tcp_echo

from kvswitch.ovs.pipeline import GATEWAY_PORT, TUNNEL_PORT, cookie_round
from tests.conftest import register_run

BR = "k-vswitch0"


SLOW_CALLBACK_MS = 100


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(nodes=3, overlay="vxlan", asyncio_slow_ms=SLOW_CALLBACK_MS)
    register_run(c.bed.run_id)
    with c:
        for node in c.bed.nodes.values():
            for i in range(2):
                c.add_pod(node, f"{node.name}-p{i}", labels={"app": f"a{i}"})
        yield c


@pytest.fixture(autouse=True)
def _agents_never_block_their_event_loop(cluster: Cluster) -> Iterator[None]:
    """The agents run with asyncio's slow-callback detection; a report fails the test it came in
    (the first test also answers for the cluster's start)."""
    yield
    slow = cluster.slow_callbacks()
    assert not slow, f"an agent's event loop was blocked for {SLOW_CALLBACK_MS} ms or more:\n" + "\n".join(
        slow
    )


def endpoints(c: Cluster) -> list[tuple[str, str, str]]:
    return [(f"{p.namespace}/{p.name}", p.netns, p.ip) for p in c.pods.values()]


def flows(node: Node) -> str:
    return node.ovs.ofctl("dump-flows", "--no-stats", BR).stdout


def assert_full_matrix(c: Cluster) -> None:
    matrices = asyncio.run(full_matrix(endpoints(c)))
    for proto, results in matrices.items():
        failed = [pair for pair, ok in results.items() if not ok]
        assert not failed, f"{proto}: {failed}\n{c.tail_logs()}"


def set_overlay(c: Cluster, overlay: str) -> None:
    generations = {n: c.edit_vswitchconfig(n, {"overlayType": overlay}) for n in c.bed.nodes}
    for name, gen in generations.items():
        c.client.wait_for(f"{name} Ready at generation {gen}", functools.partial(c.ready, name, gen), 30)
    for node in c.bed.nodes.values():
        assert node.ovs.vsctl("get", "interface", TUNNEL_PORT, "type").stdout.strip() == overlay


class TestOverlay:
    def test_full_matrix_over_vxlan_then_gre_without_restart(self, cluster: Cluster) -> None:
        assert_full_matrix(cluster)
        pids = {name: p.popen.pid for name, p in cluster.processes.items()}
        set_overlay(cluster, "gre")
        try:
            time.sleep(0.2)
            assert_full_matrix(cluster)
        finally:
            set_overlay(cluster, "vxlan")
        assert {name: p.popen.pid for name, p in cluster.processes.items()} == pids
        assert all(p.popen.poll() is None for p in cluster.processes.values())

    def test_controller_created_one_config_per_node_owned_by_it(self, cluster: Cluster) -> None:
        configs = cluster.client.list(VSC)
        assert sorted(c["metadata"]["name"] for c in configs) == sorted(cluster.bed.nodes)
        for cfg in configs:
            node = cluster.bed.nodes[cfg["metadata"]["name"]]
            assert cfg["spec"]["overlayIP"] == node.underlay_ip
            assert cfg["spec"]["podCIDR"] == cluster.pod_cidr(node)
            assert cfg["metadata"]["ownerReferences"][0]["kind"] == "Node"


class TestController:
    def test_user_edit_of_the_overlay_survives_the_controller(self, cluster: Cluster) -> None:
        gen = cluster.edit_vswitchconfig("node2", {"mtu": 1400})
        cluster.client.wait_for("node2 Ready with mtu", functools.partial(cluster.ready, "node2", gen), 30)
        # the controller reconciles node2 again (a Node change), and must leave the user's mtu alone
        cluster.client.patch("/api/v1/nodes/node2", {"metadata": {"labels": {"touched": "yes"}}})
        time.sleep(1.0)
        spec = (cluster.vswitchconfig("node2") or {})["spec"]
        assert spec.get("mtu") == 1400
        mtu = run(["cat", "/sys/class/net/kvs-gw0/mtu"], cluster.bed.nodes["node2"].netns).stdout.strip()
        assert mtu == "1400"
        gen = cluster.edit_vswitchconfig("node2", {"mtu": None})
        cluster.client.wait_for("node2 Ready", functools.partial(cluster.ready, "node2", gen), 30)

    def test_node_without_pod_cidr_gets_an_event_then_a_config(self, cluster: Cluster) -> None:
        cluster.client.create(
            "/api/v1/nodes",
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": "late"},
                "status": {"addresses": [{"type": "InternalIP", "address": "10.250.0.99"}]},
            },
        )
        try:

            def pending_event() -> bool:
                events = cluster.client.list("/api/v1/events") + cluster.client.list(
                    "/apis/events.k8s.io/v1/events"
                )
                return any(e.get("reason") == "VSwitchConfigPending" and "late" in str(e) for e in events)

            cluster.client.wait_for("VSwitchConfigPending event", pending_event, 20)
            assert cluster.vswitchconfig("late") is None
            cluster.client.patch("/api/v1/nodes/late", {"spec": {"podCIDR": "10.244.99.0/24"}})
            cfg = cluster.client.wait_for("VSwitchConfig late", lambda: cluster.vswitchconfig("late"), 20)
            assert cfg["spec"]["podCIDR"] == "10.244.99.0/24" and cfg["spec"]["overlayIP"] == "10.250.0.99"
        finally:
            cluster.delete_node_named("late")
            cluster.client.wait_for("late config gone", lambda: cluster.vswitchconfig("late") is None, 20)


class TestPaths:
    def test_pod_to_gateway_remote_pod_and_node(self, cluster: Cluster) -> None:
        p = cluster.pods[("default", "node1-p0")]
        remote = cluster.pods[("default", "node2-p1")]

        async def probe() -> list[bool]:
            return list(
                await asyncio.gather(
                    ping(p.netns, "10.244.1.1"),  # own gateway
                    ping(p.netns, "10.244.2.1"),  # another node's gateway, through the tunnel
                    ping(p.netns, remote.ip),
                    ping(cluster.bed.nodes["node3"].netns, remote.ip),  # a node to a remote pod
                )
            )

        assert asyncio.run(probe()) == [True, True, True, True]

    def test_pod_reaches_an_external_host_through_snat(self, cluster: Cluster) -> None:
        p = cluster.pods[("default", "node2-p0")]
        seen: list[str] = []

        async def probe() -> bool:
            srv_sock = netns_socket(cluster.external_ns, socket.AF_INET, socket.SOCK_STREAM)
            srv_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv_sock.bind((EXTERNAL_IP, 8080))
            srv_sock.setblocking(False)

            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                seen.append(w.get_extra_info("peername")[0])
                w.write(await r.read(100))
                await w.drain()
                w.close()

            server = await asyncio.start_server(handle, sock=srv_sock)
            try:
                return await tcp_echo(p.netns, EXTERNAL_IP, 8080, size=64)
            finally:
                server.close()
                await server.wait_closed()

        assert asyncio.run(probe())
        assert seen == [p.node.underlay_ip]  # the pod's address never leaves the cluster


class TestArpAndSpoofing:
    def test_arp_is_answered_by_flows_and_never_broadcast(self, cluster: Cluster) -> None:
        asker = cluster.pods[("default", "node1-p0")]
        others = [p for p in cluster.pods.values() if p is not asker and p.node is asker.node]
        neighbour = others[0]

        async def probe() -> tuple[str, list[str]]:
            captures = [
                await asyncio.create_subprocess_exec(
                    "ip",
                    "netns",
                    "exec",
                    p.netns,
                    "tcpdump",
                    "-n",
                    "-l",
                    "-i",
                    "eth0",
                    "arp",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                for p in others
            ]
            await asyncio.sleep(1.0)
            try:
                gw = await arun(
                    ["arping", "-c", "2", "-w", "3", "-I", "eth0", "10.244.1.1"], asker.netns, check=False
                )
                nb = await arun(
                    ["arping", "-c", "2", "-w", "3", "-I", "eth0", neighbour.ip], asker.netns, check=False
                )
                nobody = await arun(
                    ["arping", "-c", "2", "-w", "2", "-I", "eth0", "10.244.1.250"], asker.netns, check=False
                )
                await asyncio.sleep(0.5)
            finally:
                for cap in captures:
                    cap.terminate()
            seen = [(await cap.communicate())[0].decode() for cap in captures]
            return gw.stdout + nb.stdout + f"\nnobody rc={nobody.returncode}", seen

        replies, seen = asyncio.run(probe())
        macs = set(re.findall(r"\[([0-9A-F:]{17})\]", replies.upper()))
        pod_mac = next(i["mac"] for i in neighbour.result["interfaces"] if i.get("sandbox")).upper()
        # only flows answer: the router MAC for the gateway, the pod's own MAC for the pod
        assert macs == {"02:6B:76:00:00:01", pod_mac}, replies
        assert "nobody rc=1" in replies
        for text in seen:
            assert "ARP" not in text.upper(), f"an ARP packet reached another pod: {text}"

    def test_spoofed_source_ip_or_mac_is_dropped(self, cluster: Cluster) -> None:
        p = cluster.pods[("default", "node1-p1")]
        target = cluster.pods[("default", "node2-p0")]
        assert asyncio.run(ping(p.netns, target.ip))
        run(["ip", "addr", "add", "10.244.1.99/32", "dev", "eth0"], p.netns)
        try:
            r = run(["ping", "-c", "2", "-W", "1", "-I", "10.244.1.99", target.ip], p.netns, check=False)
            assert r.returncode != 0
        finally:
            run(["ip", "addr", "del", "10.244.1.99/32", "dev", "eth0"], p.netns)
        mac = run(["cat", "/sys/class/net/eth0/address"], p.netns).stdout.strip()
        run(["ip", "link", "set", "eth0", "address", "0a:58:0a:f4:01:63"], p.netns)
        try:
            assert not asyncio.run(ping(p.netns, target.ip))
        finally:
            run(["ip", "link", "set", "eth0", "address", mac], p.netns)
        assert asyncio.run(ping(p.netns, target.ip))


class TestNetworkPolicyThroughTheApi:
    def test_policy_created_and_deleted_through_the_api_is_enforced_by_the_agents(
        self, cluster: Cluster
    ) -> None:
        server = cluster.pods[("default", "node2-p0")]  # labels app=a0
        friend = cluster.pods[("default", "node1-p1")]  # app=a1
        stranger = cluster.pods[("default", "node3-p0")]  # app=a0
        path = "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies"

        async def reach(src: ClusterPod) -> bool:
            server_task = await EchoServer(server.netns, server.ip, 7100).start()
            try:
                return await tcp_echo(src.netns, server.ip, 7100, size=64, timeout=1.0)
            finally:
                await server_task.stop()

        assert asyncio.run(reach(stranger))
        cluster.client.create(
            path,
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "a0-from-a1", "namespace": "default"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "a0"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a1"}}}]}],
                },
            },
        )
        try:
            cluster.client.wait_for("stranger denied", lambda: not asyncio.run(reach(stranger)), 20, 0.2)
            assert asyncio.run(reach(friend))
        finally:
            cluster.client.delete(f"{path}/a0-from-a1")
        cluster.client.wait_for("stranger allowed again", lambda: asyncio.run(reach(stranger)), 20, 0.2)


class TestLifecycle:
    def test_pod_deleted_takes_its_flows_with_it(self, cluster: Cluster) -> None:
        node = cluster.bed.nodes["node3"]
        cp = cluster.add_pod(node, "short-lived")
        ip = cp.ip
        cluster.client.wait_for(
            "pod flows", lambda: f"nw_dst={ip} " in flows(node) or f"nw_dst={ip}," in flows(node)
        )
        assert asyncio.run(ping(cluster.pods[("default", "node1-p0")].netns, ip))
        cluster.delete_pod(cp)
        cluster.client.wait_for("pod flows gone", lambda: ip not in flows(node))
        assert not [
            line
            for line in node.ovs.vsctl("list-ports", BR).stdout.split()
            if line.startswith("kv")
            and cp.container_id in node.ovs.vsctl("get", "port", line, "external_ids").stdout
        ]

    def test_agent_kill9_and_restart_loses_no_packet(self, cluster: Cluster) -> None:
        node = cluster.bed.nodes["node1"]
        src = cluster.pods[("default", "node2-p0")]
        dst = cluster.pods[("default", "node1-p0")]
        old_round = {cookie_round(int(c, 16)) for c in re.findall(r"cookie=(0x[0-9a-f]+)", flows(node))}
        saved_inputs(cluster, node)

        async def scenario() -> tuple[str, bool]:
            pinger = asyncio.create_task(
                arun(
                    ["ping", "-i", "0.01", "-c", "600", "-W", "1", dst.ip], src.netns, check=False, timeout=60
                )
            )
            streams = [asyncio.create_task(tcp_echo(src.netns, dst.ip, 7777, size=1 << 16, timeout=10))]
            await asyncio.sleep(1.0)
            cluster.processes[f"agent-{node.name}"].stop(signal.SIGKILL)
            cluster.start_agent(node)
            await asyncio.to_thread(
                cluster.client.wait_for, "new round", lambda: _round_changed(node, old_round), 30
            )
            result = await pinger
            return result.stdout, all(await asyncio.gather(*streams))

        async def with_server() -> tuple[str, bool]:
            server = await EchoServer(dst.netns, dst.ip, 7777).start()
            try:
                return await scenario()
            finally:
                await server.stop()

        out, tcp_ok = asyncio.run(with_server())
        assert " 0% packet loss" in out, out
        assert tcp_ok
        rounds = {cookie_round(int(c, 16)) for c in re.findall(r"cookie=(0x[0-9a-f]+)", flows(node))}
        assert len(rounds) == 1 and rounds.isdisjoint(old_round), "stale flows of the old round remain"
        cluster.wait_ready(node.name)
        # the agent had saved its inputs: the new round came from them, before the lists
        assert "warm start:" in cluster.processes[f"agent-{node.name}"].log.read_text()

    def test_warm_start_then_what_changed_while_the_agent_was_down(self, cluster: Cluster) -> None:
        """A policy created while node2's agent is down: the restarted agent replaces its old round
        from its cache (the flows as they were), then its lists bring the policy in."""
        node = cluster.bed.nodes["node2"]
        server = cluster.pods[("default", "node2-p0")]  # app=a0
        friend, stranger = cluster.pods[("default", "node1-p1")], cluster.pods[("default", "node3-p0")]
        path = "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies"

        async def reach(src: ClusterPod) -> bool:
            srv = await EchoServer(server.netns, server.ip, 7200).start()
            try:
                return await tcp_echo(src.netns, server.ip, 7200, size=64, timeout=1.0)
            finally:
                await srv.stop()

        saved_inputs(cluster, node)
        old_round = {cookie_round(int(c, 16)) for c in re.findall(r"cookie=(0x[0-9a-f]+)", flows(node))}
        cluster.processes[f"agent-{node.name}"].stop(signal.SIGKILL)
        policy = {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "a0-from-a1-while-down", "namespace": "default"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "a0"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a1"}}}]}],
            },
        }
        cluster.client.create(path, policy)
        try:
            agent = cluster.start_agent(node)
            cluster.client.wait_for("new round", lambda: _round_changed(node, old_round), 30)
            assert "warm start:" in agent.log.read_text()
            cluster.client.wait_for("stranger denied", lambda: not asyncio.run(reach(stranger)), 20, 0.2)
            assert asyncio.run(reach(friend))
        finally:
            cluster.client.delete(f"{path}/a0-from-a1-while-down")
        cluster.client.wait_for("stranger allowed again", lambda: asyncio.run(reach(stranger)), 20, 0.2)

    def test_a_damaged_cache_means_listing_first(self, cluster: Cluster) -> None:
        node = cluster.bed.nodes["node3"]
        old_round = {cookie_round(int(c, 16)) for c in re.findall(r"cookie=(0x[0-9a-f]+)", flows(node))}
        cluster.processes[f"agent-{node.name}"].stop(signal.SIGKILL)
        (cluster.node_dir(node) / "policy-inputs.cache").write_bytes(b"not a snapshot")
        agent = cluster.start_agent(node)
        cluster.client.wait_for("new round", lambda: _round_changed(node, old_round), 30)
        log = agent.log.read_text()
        assert "unreadable" in log and "warm start:" not in log
        assert_full_matrix(cluster)

    def test_vswitchd_restart_flows_back_within_a_second(self, cluster: Cluster) -> None:
        node = cluster.bed.nodes["node2"]
        before = sorted(flows(node).splitlines())
        node.ovs.kill_vswitchd()
        node.ovs.start_vswitchd()
        t0 = time.monotonic()
        cluster.bed.seed_tunnel_neighbours()  # the test bed's static underlay ARP, lost with the process
        cluster.client.wait_for(
            "flows restored", lambda: sorted(flows(node).splitlines()) == before, 10, 0.05
        )
        assert time.monotonic() - t0 < 1.0
        assert asyncio.run(
            ping(
                cluster.pods[("default", "node2-p0")].netns, cluster.pods[("default", "node1-p1")].ip, count=3
            )
        )


class TestInvalidConfig:
    def test_schema_rejects_a_bad_cidr(self, cluster: Cluster) -> None:
        with pytest.raises(ApiError) as err:
            cluster.client.patch(f"{VSC}/node1", {"spec": {"podCIDR": "10.244.1.0/40"}})
        assert err.value.status == 422

    def test_config_that_slips_past_the_schema_is_reported_and_not_applied(self, cluster: Cluster) -> None:
        node = cluster.bed.nodes["node3"]
        good = cluster.vswitchconfig("node3")
        assert good is not None
        before = flows(node)
        gw_addr = run(["ip", "-4", "-o", "addr", "show", "dev", GATEWAY_PORT], node.netns).stdout
        # valid for the schema's patterns, but not inside the cluster CIDR: only pydantic knows. The
        # controller owns podCIDR and puts the Node's back; paused, it cannot win that race (kopf
        # hands the agent only the newest version, so the invalid one could go unseen).
        controller = cluster.processes["controller"].popen
        controller.send_signal(signal.SIGSTOP)
        gen = cluster.edit_vswitchconfig("node3", {"podCIDR": "10.99.3.0/24"})
        try:

            def invalid_reported() -> bool:
                obj = cluster.vswitchconfig("node3") or {}
                return any(
                    c.get("reason") == "InvalidSpec"
                    and c.get("status") == "False"
                    and c.get("observedGeneration") == gen
                    for c in (obj.get("status") or {}).get("conditions", [])
                )

            cluster.client.wait_for("InvalidSpec condition", invalid_reported, 20)
            assert flows(node) == before
            assert run(["ip", "-4", "-o", "addr", "show", "dev", GATEWAY_PORT], node.netns).stdout == gw_addr
        finally:
            controller.send_signal(signal.SIGCONT)
            cluster.edit_vswitchconfig("node3", {"podCIDR": good["spec"]["podCIDR"]})
            cluster.wait_ready("node3")
        assert_full_matrix(cluster)


class TestNodeDeletion:
    """Last: these damage node3 for good (its pods lose their ports, then the node goes)."""

    def test_deleted_bridge_is_rebuilt_and_its_flows_replayed(self, cluster: Cluster) -> None:
        node = cluster.bed.nodes["node3"]
        src = cluster.pods[("default", "node1-p0")]
        node.ovs.vsctl("del-br", BR)
        node.ovs.vsctl("--may-exist", "add-br", BR, "--", "set", "bridge", BR, "datapath_type=netdev")

        def rebuilt() -> bool:
            ports = node.ovs.vsctl("list-ports", BR).stdout.split()
            return {GATEWAY_PORT, TUNNEL_PORT} <= set(ports) and "table=253" in flows(node)

        cluster.client.wait_for("bridge rebuilt with its flows", rebuilt, 20)
        cluster.client.wait_for(
            "remote gateway reachable", lambda: asyncio.run(ping(src.netns, "10.244.3.1")), 10
        )

    def test_node_deleted_removes_its_config_and_routes_everywhere(self, cluster: Cluster) -> None:
        gone = cluster.bed.nodes["node3"]
        cidr = cluster.pod_cidr(gone)
        assert all(f"nw_dst={cidr}" in flows(n) for n in cluster.bed.nodes.values() if n is not gone)
        cluster.delete_node(gone)
        cluster.client.wait_for(
            "VSwitchConfig node3 gone", lambda: cluster.vswitchconfig("node3") is None, 20
        )
        for n in cluster.bed.nodes.values():
            if n is not gone:
                cluster.client.wait_for(
                    f"route to {cidr} gone on {n.name}", functools.partial(_lacks, n, cidr)
                )


def saved_inputs(c: Cluster, node: Node) -> None:
    """Until the agent has saved its inputs (its warm-start cache) and had time to save any
    change since (after 2 s without one, 1 s after its previous save in the test bed)."""
    cache = c.node_dir(node) / "policy-inputs.cache"
    c.client.wait_for("the agent's warm-start cache", cache.exists, 20)
    time.sleep(4)


def _lacks(node: Node, cidr: str) -> bool:
    return f"nw_dst={cidr}" not in flows(node)


def _round_changed(node: Node, old: set[int]) -> bool:
    rounds = {cookie_round(int(c, 16)) for c in re.findall(r"cookie=(0x[0-9a-f]+)", flows(node))}
    return bool(rounds) and rounds.isdisjoint(old)
