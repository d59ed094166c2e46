"""CNI ADD+DEL cycle latency: k-vswitch-cni vs Debian's Go bridge + host-local, same run; and how
long after ADD returns the pod's first packet is answered.

One cycle is what a pod start and stop cost the runtime: create the pod's network namespace,
exec the plugin for ADD, exec it for DEL, delete the namespace. All plugins run inside simulated
nodes' namespaces, exec'd the same way, interleaved so machine noise hits all alike.

The headline row is k-vswitch-cni served by a real node agent (NodeAgent in this process, as the
policy and readiness tests run it): its ADD returns only once the pod's flows and NetworkPolicy
flows are in OVS. Prints p50/p99 per plugin and the ratio (target: p50 ratio <= 1.5), plus
informational rows: the bare CNI server (no agent, one NORMAL flow), the server with DEL waiting
for the kernel's veth deletion, and the in-process fallback.

First packet: between ADD and DEL (outside the cycle's time) the new pod sends ONE ICMP echo to
its gateway, from a raw socket opened before ADD; the time from ADD's return to the reply is the
"first packet answered" latency (p50/p99; an echo unanswered within 1 s counts as lost, no retry).
It includes the pod's ARP for the gateway and the node's ARP for the pod. The bridge baseline's
gateway is an address on its Linux bridge.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from kvswitch_testbed import Node, TestBed, find_leaks
from kvswitch_testbed.bed import agent_settings
from kvswitch_testbed.cni_harness import CNI_BIN, CniNode
from kvswitch_testbed.cni_runner import Plugins, netns_path
from kvswitch_testbed.netns import netns_socket, run

from kvswitch.cni.contract import CONFLIST_NAME, PLUGIN_NAME
from kvswitch.cni.server import CniServer, ServerThread
from kvswitch.config import AgentSettings, VSwitchConfigSpec, parse_spec
from kvswitch.node.agent import NodeAgent
from kvswitch.policy.model import PodInfo

T = TypeVar("T")
POD_NAMESPACE = "bench"
ECHO_TIMEOUT = 1.0
BRIDGE_SUBNET = "10.30.0.0/16"
BRIDGE_GATEWAY = "10.30.0.1"


class AgentThread:
    """A NodeAgent (the node agent without kopf: bridge, flows, its CNI server) on its own event
    loop in a thread. API events are fed by hand: :meth:`pod_event` is what the pod watch does."""

    def __init__(self, settings: AgentSettings, spec: VSwitchConfigSpec) -> None:
        self.settings, self.spec = settings, spec
        self.agent: NodeAgent | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main()), name="kvs-agent", daemon=True
        )

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.agent = NodeAgent(self.settings)
        try:
            try:
                await self.agent.start()
                await self.agent.apply_local(self.spec)
                await self.agent.finish_startup()
            except BaseException as exc:
                self._error = exc
                return
            finally:
                self._ready.set()
            await self._stop.wait()
        finally:
            await self.agent.stop()

    def start(self, timeout: float = 60.0) -> AgentThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"agent of {self.settings.node_name} did not start in {timeout}s")
        if self._error is not None:
            self._thread.join(30)
            raise self._error
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def pod_event(self, name: str, present: bool) -> None:
        """The API's pod (ADDED before the runtime's ADD, DELETED after its DEL), as the pod watch does."""

        async def event() -> None:
            assert self.agent is not None
            key = f"{POD_NAMESPACE}/{name}"
            if present:
                obj = {"metadata": {"name": name, "namespace": POD_NAMESPACE, "labels": {"app": "bench"}},
                       "spec": {"nodeName": self.settings.node_name}}  # fmt: skip
                self.agent.set_pod(key, PodInfo.parse(obj))
            else:
                self.agent.set_pod(key, None)
                await self.agent.pod_deleted(POD_NAMESPACE, name)

        self.run(event())

    def drain(self) -> None:
        assert self.agent is not None
        self.run(self.agent.cni_server.drain())

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def start_agent(bed: TestBed, node: Node) -> tuple[AgentThread, dict[str, Any]]:
    """An agent on ``node``; returns it and the k-vswitch-cni netconf from the conflist it wrote
    (only the k-vswitch-cni entry: the baseline runs one plugin too)."""
    import json

    d = bed.workdir / f"agent-{node.name}"
    settings = agent_settings(node, d)
    spec = parse_spec(
        {
            "clusterCIDR": "10.244.0.0/16",
            "podCIDR": f"10.244.{node.index}.0/24",
            "serviceCIDR": "10.96.0.0/12",
            "overlayType": "vxlan",
            "overlayIP": node.underlay_ip,
        }
    )
    agent = AgentThread(settings, spec).start()
    conflist = json.loads((d / "net.d" / CONFLIST_NAME).read_text())
    conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}
    assert conf["type"] == PLUGIN_NAME
    return agent, conf


# --- one ICMP echo from a raw socket ------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    payload = b"k-vswitch first packet"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload


def echo(sock: socket.socket, dst: str, ident: int, seq: int, timeout: float = ECHO_TIMEOUT) -> bool:
    """Send one echo request; True when its reply arrives within ``timeout`` (no retry)."""
    sock.sendto(echo_request(ident, seq), (dst, 0))
    deadline = time.perf_counter() + timeout
    while (left := deadline - time.perf_counter()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        data = sock.recv(2048)
        ihl = (data[0] & 0x0F) * 4
        if len(data) >= ihl + 8:
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if kind == 0 and rid == ident and rseq == seq:
                return True
    return False


# --- cycles ---------------------------------------------------------------------------------------


class Cycle:
    """ADD+DEL of one plugin with a fresh namespace per cycle; keeps per-phase timings, and with a
    ``gateway`` the first packet's latency after ADD (measured between ADD and DEL, not counted in
    the cycle). With an ``agent`` the pod exists in its view of the API from before ADD to after DEL."""

    def __init__(
        self,
        bed: TestBed,
        plugins: Plugins,
        plugin_type: str,
        conf: dict[str, Any],
        tag: str,
        *,
        gateway: str | None = None,
        agent: AgentThread | None = None,
    ) -> None:
        self.bed, self.plugins, self.type, self.conf, self.tag = bed, plugins, plugin_type, conf, tag
        self.gateway, self.agent = gateway, agent
        self.total: list[float] = []
        self.add: list[float] = []
        self.delete: list[float] = []
        self.first: list[float] = []  # ADD returned -> echo reply, answered echoes only
        self.lost = 0
        self.n = 0

    def __call__(self) -> None:
        self.n += 1
        ns = f"{self.bed.prefix}-b{self.tag}{self.n}"
        cid = f"bench-{self.tag}-{self.n}"
        pod = f"pod-{self.tag}{self.n}"
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={POD_NAMESPACE};K8S_POD_NAME={pod};K8S_POD_UID={cid}"
        if self.agent is not None:
            self.agent.pod_event(pod, present=True)
        t0 = time.perf_counter()
        run(["ip", "netns", "add", ns])
        t1 = time.perf_counter()
        sock = (
            netns_socket(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) if self.gateway else None
        )
        try:
            t_sock = time.perf_counter()
            added = self.plugins.exec(self.type, "ADD", self.conf, container_id=cid, netns=netns_path(ns),
                                      ifname="eth0", args=args)  # fmt: skip
            t2 = time.perf_counter()
            if sock is not None and added.ok:
                if echo(sock, self.gateway or "", os.getpid() & 0xFFFF, self.n & 0xFFFF):
                    self.first.append(time.perf_counter() - t2)
                else:
                    self.lost += 1
        finally:
            if sock is not None:
                sock.close()
        t2b = time.perf_counter()
        deleted = self.plugins.exec(self.type, "DEL", self.conf, container_id=cid, netns=netns_path(ns),
                                    ifname="eth0", args=args)  # fmt: skip
        t3 = time.perf_counter()
        run(["ip", "netns", "del", ns])
        t4 = time.perf_counter()
        if self.agent is not None:
            self.agent.pod_event(pod, present=False)
        if not (added.ok and deleted.ok):
            raise RuntimeError(f"{self.type}: ADD {added} / DEL {deleted}")
        self.add.append(t2 - t_sock)
        self.delete.append(t3 - t2b)
        # netns add + ADD + DEL + netns del; the socket and the echo are not the runtime's cost
        self.total.append((t1 - t0) + (t2 - t_sock) + (t4 - t2b))

    def reset(self) -> None:
        for values in (self.total, self.add, self.delete, self.first):
            values.clear()
        self.lost = 0


def pct(values: list[float], p: int) -> float:
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=100, method="inclusive")[p - 1] * 1000
        if len(values) > 1
        else values[0] * 1000
    )


def line(label: str, c: Cycle) -> str:
    return (
        f"{label:<46} p50 {pct(c.total, 50):6.1f} ms  p99 {pct(c.total, 99):6.1f} ms"
        f"   (ADD p50 {pct(c.add, 50):5.1f}, DEL p50 {pct(c.delete, 50):5.1f}; n={len(c.total)})"
    )


def first_line(label: str, c: Cycle) -> str:
    return (
        f"{label:<46} p50 {pct(c.first, 50):6.2f} ms  p99 {pct(c.first, 99):6.2f} ms"
        f"   (lost {c.lost} of {len(c.first) + c.lost})"
    )


def ratio(a: Cycle, b: Cycle, p: int) -> float:
    return pct(a.total, p) / pct(b.total, p)


def interleaved(cycles: list[Callable[[], None]], rounds: int) -> None:
    for _ in range(rounds):
        for c in cycles:
            c()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    bed = TestBed()
    agent: AgentThread | None = None
    try:
        cni = CniNode(bed)
        ours = Cycle(bed, cni.plugins, PLUGIN_NAME, cni.conf(), "k", gateway="10.20.0.1")
        bridge_conf = {
            "cniVersion": "1.0.0",  # the newest Debian's bridge 1.1.1 speaks
            "name": "bench-bridge",
            "type": "bridge",
            "bridge": "cni-bench0",
            "ipam": {"type": "host-local", "subnet": BRIDGE_SUBNET, "dataDir": str(cni.ipam_dir)},
        }
        # The bridge plugin finds its bridge with the gateway address on it (no isGateway: its ADD
        # stays the plugin's plain ADD), so its pods have a gateway to send the first packet to.
        node_ns = cni.node.netns
        run(["ip", "link", "add", "cni-bench0", "type", "bridge"], node_ns)
        run(["ip", "addr", "add", f"{BRIDGE_GATEWAY}/16", "dev", "cni-bench0"], node_ns)
        run(["ip", "link", "set", "cni-bench0", "up"], node_ns)
        bridge = Cycle(
            bed, Plugins([CNI_BIN], netns=node_ns), "bridge", bridge_conf, "g", gateway=BRIDGE_GATEWAY
        )

        # The same server code with DEL waiting for the kernel's veth deletion, on its own socket.
        sync_socket = cni.workdir / "cni-sync.sock"
        sync_server = ServerThread(
            CniServer(sync_socket, host_netns=netns_path(cni.node.netns), defer_veth_delete=False)
        ).start()
        sync = Cycle(bed, cni.plugins, PLUGIN_NAME, cni.conf(serverSocket=str(sync_socket)), "s")

        # The real thing: a node agent hosting the server, on a node of its own.
        agent_node = bed.add_node()
        bed.seed_tunnel_neighbours()
        agent, agent_conf = start_agent(bed, agent_node)
        agent_plugins = Plugins([str(bed.workdir / f"agent-{agent_node.name}" / "cni-bin"), CNI_BIN],
                                netns=agent_node.netns)  # fmt: skip
        gateway = f"10.244.{agent_node.index}.1"
        with_agent = Cycle(bed, agent_plugins, PLUGIN_NAME, agent_conf, "a", gateway=gateway, agent=agent)

        rows = [with_agent, ours, sync, bridge]
        try:
            interleaved(list(rows), args.warmup)
            for c in rows:
                c.reset()
            interleaved(list(rows), args.cycles)
            agent.drain()
        finally:
            sync_server.stop()
            cni.stop_server()

        fallback = Cycle(bed, cni.plugins, PLUGIN_NAME, cni.conf(in_process=True), "f")
        interleaved([fallback], max(10, args.cycles // 10))

        leftovers = cni.leftovers()
        cni.close()
    finally:
        if agent is not None:
            agent.stop()
        bed.teardown()
    leaked = find_leaks(bed.run_id)

    print("CNI ADD+DEL cycle (netns add, ADD, DEL, netns del), userspace OVS")
    print(line("k-vswitch-cni via the node agent (default)", with_agent))
    print(line("Debian bridge + host-local (Go)", bridge))
    print(
        f"ratio k-vswitch-cni (agent) / bridge:  p50 {ratio(with_agent, bridge, 50):.2f}"
        f"   p99 {ratio(with_agent, bridge, 99):.2f}   (target: p50 <= 1.5)"
    )
    print(line("k-vswitch-cni, bare CNI server (no agent)", ours))
    print(f"ratio of that one / bridge:            p50 {ratio(ours, bridge, 50):.2f}")
    print(line("k-vswitch-cni, DEL waits for veth deletion", sync))
    print(f"ratio of that one / bridge:            p50 {ratio(sync, bridge, 50):.2f}")
    print(line("k-vswitch-cni in-process (no server)", fallback))
    print()
    print("ADD returned -> first packet answered (one ICMP echo pod -> gateway, no retry)")
    print(first_line("k-vswitch-cni via the node agent", with_agent))
    print(first_line("k-vswitch-cni, bare CNI server (NORMAL flow)", ours))
    print(first_line("Debian bridge (Linux bridge)", bridge))
    if leftovers or leaked:
        raise SystemExit(f"benchmark left things behind: {leftovers} {leaked}")
    if with_agent.lost:
        raise SystemExit(f"{with_agent.lost} first packets through the agent were not answered")


if __name__ == "__main__":
    main()
