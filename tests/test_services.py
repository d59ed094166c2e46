"""The OpenFlow service proxy with real packets: two real-OVS nodes, agents in-process, pods wired
by k-vswitch-cni, Services and EndpointSlices handed to the agents as the API would send them.

Backends answer with their own name, so a test sees which endpoint a connection reached and from
which address the backend saw it coming.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from kvswitch_testbed import probes
from kvswitch_testbed.netns import netns_socket
from kvswitch_testbed.probes import WhoAmI
from kvswitch_testbed.sctp import IPPROTO_SCTP, SctpCatcher, init_packet

from kvswitch.node.agent import NodeAgent
from kvswitch.ovs.pipeline import HAIRPIN_SNAT_IP, Category
from kvswitch.policy.model import NamespaceInfo, PodInfo, Policy
from tests.test_policy import PolicyBed

pytestmark = pytest.mark.asyncio(loop_scope="module")
NS = "svc"


@dataclass
class Pod:
    name: str
    ip: str
    netns: str
    node: str


@dataclass
class ServiceBed(PolicyBed):
    backends: dict[str, Pod] = field(default_factory=dict)
    whoami: list[WhoAmI] = field(default_factory=list)

    async def pod(self, name: str, node: str, labels: dict[str, str]) -> Pod:
        obj = {
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "c", "ports": [{"name": "web", "containerPort": 8080}]}],
            },
            "status": {},
        }
        ip = await self.add_pod(obj)
        pod = Pod(name, ip, self.pods[ip][0], node)
        for agent in self.agents.values():
            agent.set_pod(f"{NS}/{name}", PodInfo.parse({**obj, "status": {"podIP": ip}}))
        return pod

    async def serve(self, pod: Pod, *ports: int) -> None:
        for port in ports:
            self.whoami.append(await WhoAmI(pod.netns, pod.ip, port, pod.name).start())

    async def apply(self, services: list[dict[str, Any]] = (), slices: list[dict[str, Any]] = ()) -> None:  # type: ignore[override,assignment]
        for agent in self.agents.values():
            for s in services:
                agent.set_service(_key(s), s)
            for s in slices:
                agent.set_endpoint_slice(_key(s), s)
            await agent.apply_services()

    async def delete(self, services: list[str] = (), slices: list[str] = ()) -> None:  # type: ignore[assignment]
        for agent in self.agents.values():
            for k in services:
                agent.set_service(k, None)
            for k in slices:
                agent.set_endpoint_slice(k, None)
            await agent.apply_services()

    async def stop(self) -> None:
        for s in self.whoami:
            await s.stop()
        self.whoami = []
        await super().stop()


def _key(obj: dict[str, Any]) -> str:
    return f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def service(name: str, ip: str, ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": NS, "name": name}, "spec": {"clusterIP": ip, "ports": ports, **spec}}


def endpoint_slice(
    svc: str, pods: list[Pod], ports: list[dict[str, Any]], suffix: str = "a", **conditions: bool
) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": NS,
            "name": f"{svc}-{suffix}",
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [p.ip], "nodeName": p.node, "conditions": {"ready": True, **conditions}}
            for p in pods
        ],
        "ports": ports,
    }


async def ask_tcp(netns: str, ip: str, port: int, timeout: float = 2.0) -> str:
    """The backend's ``name peer`` line, or raises (the test kit's probe, as text)."""
    answer = await probes.ask_tcp(netns, ip, port, timeout)
    return f"{answer.backend} {answer.peer}"


async def ask_udp(netns: str, ip: str, port: int, timeout: float = 0.5, attempts: int = 4) -> str:
    answer = await probes.ask_udp(netns, ip, port, timeout, attempts)
    return f"{answer.backend} {answer.peer}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sbed() -> AsyncIterator[ServiceBed]:
    async with ServiceBed.running() as b:
        yield b


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pods(sbed: ServiceBed) -> dict[str, Pod]:
    n1, n2 = sorted(sbed.bed.nodes)
    out = {
        "client": await sbed.pod("client", n1, {"role": "client"}),
        "b1": await sbed.pod("b1", n1, {"app": "web"}),
        "b2": await sbed.pod("b2", n2, {"app": "web"}),
        "b3": await sbed.pod("b3", n2, {"app": "web"}),
        "other": await sbed.pod("other", n2, {"role": "other"}),
    }
    for name in ("b1", "b2", "b3"):
        await sbed.serve(out[name], 8080, 9090)
    return out


HTTP = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
HTTP_UDP = [*HTTP, {"name": "dns", "port": 53, "targetPort": 9090, "protocol": "UDP"}]
SLICE_PORTS = [
    {"name": "http", "port": 8080, "protocol": "TCP"},
    {"name": "dns", "port": 9090, "protocol": "UDP"},
]


class TestClusterIP:
    async def test_tcp_and_udp_reach_backends_on_both_nodes_with_the_client_ip(
        self, sbed: ServiceBed, pods: dict[str, Pod]
    ) -> None:
        await sbed.apply(
            [service("web", "10.96.0.10", HTTP_UDP)],
            [endpoint_slice("web", [pods["b1"], pods["b2"], pods["b3"]], SLICE_PORTS)],
        )
        client = pods["client"]
        seen_tcp, seen_udp = Counter[str](), Counter[str]()
        for _ in range(30):
            name, peer = (await ask_tcp(client.netns, "10.96.0.10", 80)).split()
            assert peer == client.ip  # no SNAT: the backend sees the client pod
            seen_tcp[name] += 1
            uname, upeer = (await ask_udp(client.netns, "10.96.0.10", 53)).split()
            assert upeer == client.ip
            seen_udp[uname] += 1
        assert set(seen_tcp) == {"b1", "b2", "b3"}, seen_tcp  # same node and the other node
        assert set(seen_udp) == {"b1", "b2", "b3"}, seen_udp

    async def test_the_node_itself_reaches_a_cluster_ip(self, sbed: ServiceBed, pods: dict[str, Pod]) -> None:
        await sbed.apply(
            [service("web", "10.96.0.10", HTTP_UDP)],
            [endpoint_slice("web", [pods["b1"], pods["b2"], pods["b3"]], SLICE_PORTS)],
        )
        node = sbed.bed.nodes[pods["client"].node]
        names = {(await ask_tcp(node.netns, "10.96.0.10", 80)).split()[0] for _ in range(20)}
        assert names == {"b1", "b2", "b3"}

    async def test_hairpin_reaches_itself_with_a_snat_source(
        self, sbed: ServiceBed, pods: dict[str, Pod]
    ) -> None:
        await sbed.apply(
            [service("self", "10.96.0.11", HTTP)], [endpoint_slice("self", [pods["b1"]], SLICE_PORTS)]
        )
        name, peer = (await ask_tcp(pods["b1"].netns, "10.96.0.11", 80)).split()
        assert (name, peer) == ("b1", HAIRPIN_SNAT_IP)

    async def test_removing_an_endpoint_keeps_an_open_stream_to_another(
        self, sbed: ServiceBed, pods: dict[str, Pod]
    ) -> None:
        all3 = endpoint_slice("keep", [pods["b1"], pods["b2"], pods["b3"]], SLICE_PORTS)
        await sbed.apply([service("keep", "10.96.0.12", HTTP)], [all3])
        loop = asyncio.get_running_loop()
        sock = netns_socket(pods["client"].netns, socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("10.96.0.12", 80))
            first = (await asyncio.wait_for(loop.sock_recv(sock, 256), 2)).decode().split()[0]
            survivors = [p for n, p in pods.items() if n in ("b1", "b2", "b3") and n != first]
            gone = next(p for n, p in pods.items() if n not in ("client", "other") and p not in survivors)
            # Remove an endpoint other than the one this stream uses.
            victim = next(p for p in survivors)
            await sbed.apply(
                [], [endpoint_slice("keep", [gone, *[p for p in survivors if p != victim]], SLICE_PORTS)]
            )
            for i in range(20):
                await loop.sock_sendall(sock, f"msg{i}".encode())
                got = await asyncio.wait_for(loop.sock_recv(sock, 256), 2)
                assert got == f"msg{i}".encode()
            names = {(await ask_tcp(pods["client"].netns, "10.96.0.12", 80)).split()[0] for _ in range(20)}
            assert victim.name not in names
        finally:
            sock.close()

    async def test_only_a_terminating_endpoint_still_answers(
        self, sbed: ServiceBed, pods: dict[str, Pod]
    ) -> None:
        slice_ = endpoint_slice(
            "term", [pods["b2"]], SLICE_PORTS, ready=False, serving=True, terminating=True
        )
        await sbed.apply([service("term", "10.96.0.13", HTTP)], [slice_])
        assert (await ask_tcp(pods["client"].netns, "10.96.0.13", 80)).split()[0] == "b2"

    async def test_named_target_ports_and_several_ports(self, sbed: ServiceBed, pods: dict[str, Pod]) -> None:
        ports = [
            {"name": "a", "port": 1000, "targetPort": "web", "protocol": "TCP"},
            {"name": "b", "port": 2000, "targetPort": 9090, "protocol": "TCP"},
        ]
        slice_ports = [
            {"name": "a", "port": 8080, "protocol": "TCP"},
            {"name": "b", "port": 9090, "protocol": "TCP"},
        ]
        await sbed.apply(
            [service("multi", "10.96.0.14", ports)], [endpoint_slice("multi", [pods["b3"]], slice_ports)]
        )
        assert (await ask_tcp(pods["client"].netns, "10.96.0.14", 1000)).startswith("b3")
        assert (await ask_tcp(pods["client"].netns, "10.96.0.14", 2000)).startswith("b3")


class TestAffinityAndPolicy:
    async def test_client_ip_affinity_holds_then_expires(
        self, sbed: ServiceBed, pods: dict[str, Pod]
    ) -> None:
        cfg = {"clientIP": {"timeoutSeconds": 2}}
        await sbed.apply(
            [service("sticky", "10.96.0.20", HTTP, sessionAffinity="ClientIP", sessionAffinityConfig=cfg)],
            [endpoint_slice("sticky", [pods["b1"], pods["b2"], pods["b3"]], SLICE_PORTS)],
        )
        client = pods["client"]
        names = [(await ask_tcp(client.netns, "10.96.0.20", 80)).split()[0] for _ in range(20)]
        assert len(set(names)) == 1, names
        await asyncio.sleep(3.5)  # idle past the timeout: the entry expires
        spread: set[str] = set()
        deadline = time.monotonic() + 20
        while len(spread) < 2 and time.monotonic() < deadline:
            spread.add((await ask_tcp(client.netns, "10.96.0.20", 80)).split()[0])
            await asyncio.sleep(2.5)  # each connection after the previous entry expired
        assert len(spread) >= 2, spread

    async def test_ingress_policy_of_the_backend_applies_to_service_clients(
        self, sbed: ServiceBed, pods: dict[str, Pod]
    ) -> None:
        await sbed.apply(
            [service("guarded", "10.96.0.21", HTTP)], [endpoint_slice("guarded", [pods["b2"]], SLICE_PORTS)]
        )
        policy = Policy.parse(
            {
                "metadata": {"namespace": NS, "name": "only-other"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "other"}}}]}],
                },
            }
        )
        for agent in sbed.agents.values():
            agent.set_namespace(NS, NamespaceInfo.parse({"metadata": {"name": NS, "labels": {}}}))
            agent.set_policy(f"{NS}/only-other", policy)
            await agent.apply_policy()
        try:
            assert (await ask_tcp(pods["other"].netns, "10.96.0.21", 80)).startswith("b2")
            with pytest.raises((OSError, TimeoutError)):
                await ask_tcp(pods["client"].netns, "10.96.0.21", 80, timeout=1.0)
        finally:
            for agent in sbed.agents.values():
                agent.set_policy(f"{NS}/only-other", None)
                await agent.apply_policy()


class TestBadInput:
    async def test_untranslatable_service_is_skipped_and_others_stay_byte_identical(
        self, sbed: ServiceBed, pods: dict[str, Pod]
    ) -> None:
        await sbed.apply(
            [service("fine", "10.96.0.30", HTTP)], [endpoint_slice("fine", [pods["b1"]], SLICE_PORTS)]
        )
        agent: NodeAgent = next(iter(sbed.agents.values()))
        before = sorted(f.render(0) for f in agent.datapath.reconciler.desired())
        live_before = await agent.datapath.ofctl.dump()
        bad = service("bad", "10.96.0.31", [{"port": 80, "protocol": "ICMP"}])
        from kvswitch.services.model import UntranslatableService

        with pytest.raises(UntranslatableService, match="protocol"):
            agent.set_service(_key(bad), bad)
        await agent.apply_services()
        assert sorted(f.render(0) for f in agent.datapath.reconciler.desired()) == before
        live_after = await agent.datapath.ofctl.dump()
        assert {(f.table, f.priority, f.match, f.actions) for f in live_after} == {
            (f.table, f.priority, f.match, f.actions) for f in live_before
        }
        assert (await ask_tcp(pods["client"].netns, "10.96.0.30", 80)).startswith("b1")
        assert not [
            o
            for o in agent.datapath.reconciler.owners
            if o.category == Category.SERVICE and o.name == f"{NS}/bad"
        ]


class TestFrontends:
    async def test_no_endpoints_is_refused_at_once(self, sbed: ServiceBed, pods: dict[str, Pod]) -> None:
        await sbed.apply(
            [service("empty", "10.96.0.40", HTTP_UDP)], [endpoint_slice("empty", [], SLICE_PORTS)]
        )
        client = pods["client"]
        for _ in range(5):
            t0 = time.monotonic()
            with pytest.raises(ConnectionRefusedError):
                await ask_tcp(client.netns, "10.96.0.40", 80)
            assert time.monotonic() - t0 < 0.1
        with pytest.raises(ConnectionRefusedError):
            await ask_udp(client.netns, "10.96.0.40", 53)
        # an endpoint appears: the same frontend now answers
        await sbed.apply([], [endpoint_slice("empty", [pods["b1"]], SLICE_PORTS)])
        assert (await ask_tcp(client.netns, "10.96.0.40", 80)).startswith("b1")

    async def test_node_port_external_ip_and_load_balancer_ip(
        self, sbed: ServiceBed, pods: dict[str, Pod]
    ) -> None:
        ports = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}]
        svc = service("np", "10.96.0.41", ports, type="LoadBalancer", externalIPs=["192.0.2.41"])
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.42"}]}}
        await sbed.apply([svc], [endpoint_slice("np", [pods["b2"]], SLICE_PORTS)])
        client = pods["client"]
        node = sbed.bed.nodes[client.node]
        for ip, port in (("192.0.2.41", 80), ("192.0.2.42", 80), (node.underlay_ip, 30080)):
            assert (await ask_tcp(client.netns, ip, port)).startswith("b2"), (ip, port)

    async def test_internal_traffic_policy_local(self, sbed: ServiceBed, pods: dict[str, Pod]) -> None:
        await sbed.apply(
            [service("local", "10.96.0.42", HTTP, internalTrafficPolicy="Local")],
            [endpoint_slice("local", [pods["b1"], pods["b2"], pods["b3"]], SLICE_PORTS)],
        )
        names = {(await ask_tcp(pods["client"].netns, "10.96.0.42", 80)).split()[0] for _ in range(15)}
        assert names == {"b1"}  # the only endpoint on the client's node
        # the other node has two local endpoints, and never uses b1
        names = {(await ask_tcp(pods["other"].netns, "10.96.0.42", 80)).split()[0] for _ in range(15)}
        assert names == {"b2", "b3"}


class TestNodePortFromOutside:
    async def test_every_node_answers_with_cluster_policy_and_masquerades(
        self, sbed: ServiceBed, pods: dict[str, Pod]
    ) -> None:
        ports = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30081}]
        await sbed.apply(
            [service("npc", "10.96.0.50", ports, type="NodePort")],
            [endpoint_slice("npc", [pods["b2"]], SLICE_PORTS)],
        )
        for node in sbed.bed.nodes.values():
            name, peer = (await ask_tcp(sbed.ext_ns, node.underlay_ip, 30081)).split()
            assert name == "b2"
            # masqueraded by the node the client reached, so replies go back the same way
            assert peer == sbed.gateway_ip(node), (node.name, peer)
            # and from the node itself, to its own address
            assert (await ask_tcp(node.netns, node.underlay_ip, 30081)).startswith("b2"), node.name

    async def test_local_policy_keeps_the_client_ip_and_only_nodes_with_endpoints_answer(
        self, sbed: ServiceBed, pods: dict[str, Pod]
    ) -> None:
        ports = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30082}]
        svc = service("npl", "10.96.0.51", ports, type="NodePort", externalTrafficPolicy="Local")
        await sbed.apply([svc], [endpoint_slice("npl", [pods["b2"]], SLICE_PORTS)])
        with_endpoint = sbed.bed.nodes[pods["b2"].node]
        without = next(n for n in sbed.bed.nodes.values() if n is not with_endpoint)
        name, peer = (await ask_tcp(sbed.ext_ns, with_endpoint.underlay_ip, 30082)).split()
        assert name == "b2" and peer not in (sbed.gateway_ip(with_endpoint), with_endpoint.underlay_ip)
        assert peer.startswith(with_endpoint.underlay_ip.rsplit(".", 1)[0])  # the external host itself
        with pytest.raises((OSError, TimeoutError)):
            await ask_tcp(sbed.ext_ns, without.underlay_ip, 30082, timeout=1.0)


class TestEndpointChurn:
    async def test_udp_clients_move_on_when_their_endpoint_goes(
        self, sbed: ServiceBed, pods: dict[str, Pod]
    ) -> None:
        dns = [{"name": "dns", "port": 53, "targetPort": 9090, "protocol": "UDP"}]
        await sbed.apply(
            [service("udp", "10.96.0.60", dns)], [endpoint_slice("udp", [pods["b1"]], SLICE_PORTS)]
        )
        loop = asyncio.get_running_loop()
        sock = netns_socket(pods["client"].netns, socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("10.96.0.60", 53))  # one 5-tuple for the whole test

            async def ask() -> str:
                for _ in range(5):
                    await loop.sock_sendall(sock, b"?")
                    with contextlib.suppress(TimeoutError):
                        return (await asyncio.wait_for(loop.sock_recv(sock, 256), 0.5)).decode().split()[0]
                raise TimeoutError

            assert await ask() == "b1"
            await sbed.apply([], [endpoint_slice("udp", [pods["b3"]], SLICE_PORTS)])
            # b1 still runs and would answer: only a flushed conntrack entry sends the client on
            assert await ask() == "b3"
        finally:
            sock.close()


class TestHealthCheckNodePort:
    async def test_answers_the_local_endpoint_count(self, sbed: ServiceBed, pods: dict[str, Pod]) -> None:
        ports = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30083}]
        svc = service(
            "hc",
            "10.96.0.52",
            ports,
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            healthCheckNodePort=32001,
        )
        await sbed.apply([svc], [endpoint_slice("hc", [pods["b2"], pods["b3"]], SLICE_PORTS)])
        with_endpoints = sbed.bed.nodes[pods["b2"].node]
        without = next(n for n in sbed.bed.nodes.values() if n is not with_endpoints)
        for node, status, count in ((with_endpoints, 200, 2), (without, 503, 0)):
            got_status, body = await http_get(sbed.ext_ns, node.underlay_ip, 32001)
            assert got_status == status
            assert json.loads(body) == {
                "service": {"namespace": NS, "name": "hc"},
                "localEndpoints": count,
                "serviceProxyHealthy": True,
            }
        await sbed.delete(services=[f"{NS}/hc"])
        with pytest.raises(OSError):
            await http_get(sbed.ext_ns, with_endpoints.underlay_ip, 32001)


async def http_get(netns: str, ip: str, port: int) -> tuple[int, str]:
    loop = asyncio.get_running_loop()
    sock = netns_socket(netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), 2)
        await loop.sock_sendall(sock, f"GET /healthz HTTP/1.1\r\nHost: {ip}\r\n\r\n".encode())
        data = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 4096), 2):
            data += chunk
        head, _, body = data.decode().partition("\r\n\r\n")
        return int(head.split()[1]), body
    finally:
        sock.close()


class TestScaleAndRestart:
    async def test_one_to_three_hundred_to_one_endpoints(
        self, sbed: ServiceBed, pods: dict[str, Pod]
    ) -> None:
        """299 of the 300 endpoints are addresses of no pod: every connection must still reach the
        one real backend when the Service is back to one endpoint, and the group holds 300 buckets."""
        await sbed.apply(
            [service("scale", "10.96.0.70", HTTP)], [endpoint_slice("scale", [pods["b3"]], SLICE_PORTS)]
        )
        assert (await ask_tcp(pods["client"].netns, "10.96.0.70", 80)).startswith("b3")
        ghosts = [
            Pod(f"g{i}", f"10.244.{200 + i // 250}.{1 + i % 250}", "", pods["b3"].node) for i in range(299)
        ]
        slices = [
            endpoint_slice("scale", chunk, SLICE_PORTS, suffix=str(n))
            for n, chunk in enumerate([[pods["b3"], *ghosts[:99]], ghosts[99:199], ghosts[199:]])
        ]
        await sbed.apply([], slices)
        agent = sbed.agents[pods["client"].node]
        groups = await agent.datapath.ofctl.dump_groups()
        assert max(text.count("bucket=") for text in groups.values()) == 300
        await sbed.delete(slices=[f"{NS}/scale-1", f"{NS}/scale-2"])
        await sbed.apply([], [endpoint_slice("scale", [pods["b3"]], SLICE_PORTS, suffix="0")])
        for _ in range(10):
            assert (await ask_tcp(pods["client"].netns, "10.96.0.70", 80)).startswith("b3")

    async def test_agent_restart_keeps_a_stream_through_a_service(
        self, sbed: ServiceBed, pods: dict[str, Pod]
    ) -> None:
        svc = service("restart", "10.96.0.71", HTTP)
        slice_ = endpoint_slice("restart", [pods["b2"]], SLICE_PORTS)
        await sbed.apply([svc], [slice_])
        loop = asyncio.get_running_loop()
        client = pods["client"]
        sock = netns_socket(client.netns, socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("10.96.0.71", 80))
            assert (await asyncio.wait_for(loop.sock_recv(sock, 256), 2)).startswith(b"b2")
            old = sbed.agents[client.node]
            await old.stop()  # no cleanup of flows: what a kill -9 leaves behind
            new = NodeAgent(old.settings)
            sbed.agents[client.node] = new
            await new.start()
            spec = old.datapath.local_config()
            assert spec is not None
            await new.apply_local(spec)
            for other in sbed.agents.values():
                other_spec = other.datapath.local_config()
                if other is not new and other_spec is not None:
                    await new.set_remote(other.settings.node_name, other_spec)
            new.set_service(_key(svc), svc)
            new.set_endpoint_slice(_key(slice_), slice_)
            await new.apply_services()
            sent = 0
            for i in range(50):  # the stream keeps flowing while the new round replaces the old
                await loop.sock_sendall(sock, f"m{i}".encode())
                got = await asyncio.wait_for(loop.sock_recv(sock, 256), 2)
                assert got == f"m{i}".encode()
                sent += 1
                if i == 10:
                    await new.finish_startup()
            assert sent == 50
            assert (await ask_tcp(client.netns, "10.96.0.71", 80)).startswith("b2")
            live_rounds = {f.cookie >> 48 for f in await new.datapath.ofctl.dump() if f.cookie >> 48}
            assert live_rounds == {new.datapath.reconciler.round}
        finally:
            sock.close()


class TestSctp:
    async def test_sctp_init_is_translated_to_the_endpoint(
        self, sbed: ServiceBed, pods: dict[str, Pod]
    ) -> None:
        """The pods' kernels have no SCTP sockets: a crafted INIT to the ClusterIP must arrive at the
        backend addressed to the endpoint's port, from the client."""
        ports = [{"name": "sctp", "port": 9, "targetPort": 9999, "protocol": "SCTP"}]
        slice_ports = [{"name": "sctp", "port": 9999, "protocol": "SCTP"}]
        await sbed.apply(
            [service("sctp", "10.96.0.80", ports)], [endpoint_slice("sctp", [pods["b2"]], slice_ports)]
        )
        catcher = SctpCatcher(pods["b2"].netns)
        sock = netns_socket(pods["client"].netns, socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP)
        try:
            tag = int.from_bytes(os.urandom(4), "big") | 1
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                sock.sendto(init_packet(40000, 9, tag), ("10.96.0.80", 0))
                await asyncio.sleep(0.1)
                catcher.drain()
                if any(t == tag for _, _, t in catcher.seen):
                    break
            assert (pods["client"].ip, 9999, tag) in catcher.seen, catcher.seen
            # the backend's answer comes back from the Service address and port
            back = netns_socket(pods["b2"].netns, socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP)
            at_client = SctpCatcher(pods["client"].netns)
            try:
                reply_tag = tag ^ 0xFFFF
                for _ in range(20):
                    back.sendto(init_packet(9999, 40000, reply_tag), (pods["client"].ip, 0))
                    await asyncio.sleep(0.1)
                    at_client.drain()
                    if any(t == reply_tag for _, _, t in at_client.sources):
                        break
                assert ("10.96.0.80", 9, reply_tag) in at_client.sources, at_client.sources
            finally:
                back.close()
                at_client.close()
        finally:
            sock.close()
            catcher.close()
