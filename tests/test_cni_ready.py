"""A pod works the moment CNI ADD returns: the runtime starts the containers right after, and a
lost first packet (a DNS query) costs seconds. ADD through the agent's CNI server installs the
pod's flows, NetworkPolicy included, before it answers.

Each check sends exactly one packet, with no retry: one ICMP echo, one TCP SYN.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from kvswitch_testbed.netns import netns_socket, run
from kvswitch_testbed.probes import EchoServer

from kvswitch.policy.model import NamespaceInfo, Policy
from tests.test_policy import PolicyBed

pytestmark = pytest.mark.asyncio(loop_scope="module")
NS = "ready"
ADDS = 50


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rbed() -> AsyncIterator[PolicyBed]:
    async with PolicyBed.running() as b:
        yield b


def pod_obj(name: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c"}]},
        "status": {},
    }


async def one_syn(netns: str, ip: str, port: int, timeout: float = 0.8) -> bool:
    """connect() with a timeout shorter than the kernel's first SYN retransmission (1 s)."""
    loop = asyncio.get_running_loop()
    sock = netns_socket(netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), timeout)
        return True
    except (OSError, TimeoutError):
        return False
    finally:
        sock.close()


def one_ping(netns: str, ip: str) -> bool:
    return run(["ping", "-c", "1", "-W", "1", ip], netns, check=False).returncode == 0


async def test_fifty_adds_each_answer_their_first_packet(rbed: PolicyBed) -> None:
    n1, n2 = sorted(rbed.bed.nodes)
    for agent in rbed.agents.values():
        agent.set_namespace(NS, NamespaceInfo.parse({"metadata": {"name": NS, "labels": {}}}))
    server_ip = await rbed.add_pod(pod_obj("server", n2, {"role": "server"}))
    server_ns = rbed.pods[server_ip][0]
    echo = await EchoServer(server_ns, server_ip, 7000).start()
    try:
        pinged = syn_out = syn_in = 0
        for i in range(ADDS):
            ip = await rbed.add_pod(pod_obj(f"p{i}", n1, {"role": "client"}))
            netns = rbed.pods[ip][0]
            gateway = rbed.gateway_ip(rbed.bed.nodes[n1])
            pinged += await asyncio.to_thread(one_ping, netns, gateway)  # the pod's first packet (ARP, echo)
            syn_out += await one_syn(netns, server_ip, 7000)  # across the tunnel
            listener = await EchoServer(netns, ip, 7001).start()
            try:
                syn_in += await one_syn(server_ns, ip, 7001)  # towards the new pod
            finally:
                await listener.stop()
        assert (pinged, syn_out, syn_in) == (ADDS, ADDS, ADDS)
    finally:
        await echo.stop()


async def test_an_isolated_pod_is_never_open(rbed: PolicyBed) -> None:
    """A default-deny ingress policy exists before the pod: the first SYN after ADD is dropped."""
    n1, n2 = sorted(rbed.bed.nodes)
    deny = Policy.parse(
        {
            "metadata": {"namespace": NS, "name": "deny-locked"},
            "spec": {"podSelector": {"matchLabels": {"role": "locked"}}, "policyTypes": ["Ingress"]},
        }
    )
    for agent in rbed.agents.values():
        agent.set_policy(f"{NS}/deny-locked", deny)
        await agent.apply_policy()
    prober_ip = await rbed.add_pod(pod_obj("prober", n2, {"role": "prober"}))
    prober_ns = rbed.pods[prober_ip][0]
    opened = 0
    for i in range(10):
        obj = pod_obj(f"locked{i}", n1, {"role": "locked"})
        # the pod's server is up before ADD returns: its namespace exists before the CNI call
        t0 = time.monotonic()
        ip = await rbed.add_pod(obj)
        netns = rbed.pods[ip][0]
        listener = await EchoServer(netns, ip, 7002).start()
        try:
            opened += await one_syn(prober_ns, ip, 7002, timeout=0.3)
        finally:
            await listener.stop()
        assert time.monotonic() - t0 < 5
    assert opened == 0
